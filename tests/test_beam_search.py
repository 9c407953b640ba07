"""Beam search over forked KV equals transformers' beam search in the float32 reference mode, and leaks
nothing."""
from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.beam import beam_search

_engines: dict = {}
EOS = 2         # the tiny models' (conftest.make_config)


@pytest.fixture
def engine(tiny_model_dir):
    if "e" not in _engines:
        _engines["e"] = Engine(EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20))
    eng = _engines["e"]
    yield eng
    assert not eng.has_unfinished() and eng.pool.num_free == eng.pool.num_blocks


def hf_beams(model_dir, prompt, width, n, length_penalty, max_new_tokens):
    from transformers import AutoModelForCausalLM
    model = _engines.setdefault("hf", AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=width,
                             num_return_sequences=n, length_penalty=length_penalty, max_new_tokens=max_new_tokens,
                             pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    return [seq[len(prompt):].tolist() for seq in out.sequences], out.sequences_scores.tolist()


@pytest.mark.parametrize("width,n,length_penalty", [(2, 1, 1.0), (4, 2, 1.0), (3, 3, 0.0), (4, 2, 2.0)])
def test_beam_search_equals_transformers(engine, tiny_model_dir, width, n, length_penalty):
    prompts = random_prompts(3, [9, 23, 40], seed=width * 10 + n)
    got = beam_search(engine, prompts, SamplingParams(n=n, max_tokens=14), width, length_penalty)
    for prompt, hyps in zip(prompts, got):
        ref_seqs, ref_scores = hf_beams(tiny_model_dir("llama"), prompt, width, n, length_penalty, 14)
        assert len(hyps) == n
        for (score, tokens), ref, ref_score in zip(hyps, ref_seqs, ref_scores):
            assert tokens == ref[:len(tokens)]
            if len(tokens) < len(ref):        # it ended with EOS; transformers pads it (with EOS or pad ids)
                assert tokens[-1] == EOS and all(t in (0, EOS) for t in ref[len(tokens):])
            assert score == pytest.approx(ref_score, abs=1e-4)


def test_beam_search_settings_are_checked(engine):
    with pytest.raises(InvalidRequestError):
        beam_search(engine, [[5, 6, 7]], SamplingParams(n=3, max_tokens=4), 2)
    with pytest.raises(InvalidRequestError):
        beam_search(engine, [[5, 6, 7]], SamplingParams(max_tokens=4), 11)
    with pytest.raises(InvalidRequestError):
        beam_search(engine, [[5, 6, 7]], SamplingParams(max_tokens=4, stop=["x"]), 2)


def test_llm_generate_beam_search(tiny_model_dir):
    from kvloom import LLM
    llm = LLM(tiny_model_dir("llama"), kv_cache_memory="4MiB")
    prompt = random_prompts(1, [15], seed=3)[0]
    got = llm.generate([prompt], SamplingParams(n=2, max_tokens=8), use_beam_search=True, beam_width=3)[0]
    ref, scores = hf_beams(tiny_model_dir("llama"), prompt, 3, 2, 1.0, 8)
    assert [o.token_ids for o in got.outputs] == [r[:len(o.token_ids)] for o, r in zip(got.outputs, ref)]
    assert got.kvloom["scores"] == pytest.approx(scores, abs=1e-4)
    assert got.outputs[0].text == llm.tokenizer.decode(got.outputs[0].token_ids)
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
