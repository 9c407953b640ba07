"""Sampling filters keep only the tokens they should."""
import torch

from kvloom.engine.request import Request
from kvloom.engine.sampler import sample
from kvloom.sampling_params import SamplingParams


def _req(seed=0, **kw):
    p = SamplingParams(seed=seed, **kw)
    return Request("r", [1], p, 8, 0.0, torch.Generator().manual_seed(seed))


def _draws(logits, n=300, **kw):
    return {sample(logits[None], [_req(seed=s, **kw)]).token_ids[0] for s in range(n)}


def test_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05]))
    assert _draws(logits, top_k=2) == {0, 1}
    assert _draws(logits, top_p=0.65) == {0, 1}
    assert _draws(logits, min_p=0.4) == {0, 1, 2}
    assert _draws(logits) == {0, 1, 2, 3, 4}


def test_greedy_is_argmax_and_repetition_penalty_applies():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample(logits, [_req(temperature=0.0)]).token_ids == [1]
    r = _req(temperature=0.0, repetition_penalty=2.0)
    r.all_token_ids = [1]
    assert sample(logits, [r]).token_ids == [2]  # 3/2 < 2
