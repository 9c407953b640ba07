"""Sampling filters keep only the tokens they should."""
import pytest
import torch

from kvloom.engine.request import Request
from kvloom.engine.sampler import sample
from kvloom.kernels import kernels
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


def _reference_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_p, order = probs.sort(descending=True)
    sorted_p[sorted_p.cumsum(0) - sorted_p >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_p)


def test_batched_filters_equal_a_row_by_row_reference():
    """Peaked and flat rows (nucleus inside the first 256 candidates, inside 4096, and wider), mixed settings."""
    from kvloom.engine.sampler import batched_target_probs
    g = torch.Generator().manual_seed(0)
    vocab = 20_000
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([8.0, 8.0, 2.0, 2.0, 0.3, 0.3])[:, None]
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, min_p=m)
              for t, p, k, m in [(0.7, 0.9, 0, 0.0), (1.0, 0.95, 50, 0.0), (0.8, 0.95, 0, 0.01),
                                 (1.0, 0.99, 0, 0.0), (1.0, 0.9, 0, 0.0), (1.3, 0.5, 7000, 0.0)]]
    got = batched_target_probs(logits, params)
    for i, p in enumerate(params):
        x = logits[i] / p.temperature
        if p.top_k:
            x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
        probs = torch.softmax(x, -1)
        if p.min_p:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        want = _reference_top_p(probs, p.top_p)
        assert torch.equal(got[i] > 0, want > 0), i
        torch.testing.assert_close(got[i], want)


def test_a_row_draws_the_same_token_alone_or_batched():
    from kvloom.engine.sampler import sample as draw
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 5000, generator=g) * 3
    settings = [dict(temperature=0.0), dict(temperature=0.7, top_p=0.95), dict(temperature=1.0, top_k=20),
                dict(temperature=0.9, min_p=0.05)] * 3
    batched = draw(logits, [_req(seed=i, **kw) for i, kw in enumerate(settings)]).token_ids
    alone = [draw(logits[i:i + 1], [_req(seed=i, **kw)]).token_ids[0] for i, kw in enumerate(settings)]
    assert batched == alone


def _mixed_logits(rows=10, vocab=6000, seed=2):
    """Peaked and flat rows, ties, -inf entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.linspace(0.3, 9.0, rows)[:, None]
    x[1] = x[1].round()                        # ties
    x[2, ::2] = float("-inf")
    x[3, 10:20] = x[3].max()                   # a tie at the top
    return x


_SETTINGS = [dict(temperature=0.7, top_p=0.95), dict(temperature=1.0, top_k=40), dict(temperature=0.9, min_p=0.05),
             dict(temperature=0.0), dict(temperature=1.3, top_p=0.5, top_k=200), dict(temperature=0.8, top_p=0.99),
             dict(temperature=0.6, top_p=0.9, min_p=0.02), dict(temperature=1.0, top_k=1),
             dict(temperature=0.7, top_p=0.95), dict(temperature=1.1, top_k=3000, top_p=0.97)]


@pytest.mark.skipif(kernels() is None, reason="native kernels are turned off (KVLOOM_NO_KERNELS)")
def test_native_draws_equal_torch_draws_alone_or_batched():
    """Seeded draws: the native path picks the token the torch path picks (rows without ties in their
    nucleus; the probabilities agree to float rounding, far from these draws' boundaries), and a row draws the
    same token alone or batched, greedy rows mixed in."""
    x = _mixed_logits()
    x[1] += torch.rand(x.shape[1], generator=torch.Generator().manual_seed(5)) * 1e-3   # break its ties
    x[3, 10:20] += torch.arange(10) * 1e-3
    for rep in range(20):
        reqs = lambda: [_req(seed=100 * rep + i, **kw) for i, kw in enumerate(_SETTINGS)]   # noqa: E731
        native = sample(x, reqs(), native=True).token_ids
        assert native == sample(x, reqs()).token_ids, rep
        alone = [sample(x[i:i + 1], [r], native=True).token_ids[0] for i, r in enumerate(reqs())]
        assert native == alone, rep
