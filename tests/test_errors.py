"""Bad input gets a clear typed error, and the engine then serves other requests normally."""
import json
import os
import shutil

import pytest

from conftest import random_prompts
from kvloom import LLM, SamplingParams
from kvloom.errors import (InvalidRequestError, InvalidSamplingParamsError, ModelNotFoundError,
                           PromptTooLongError, UnsupportedArchitectureError, WeightsError)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), max_model_len=128)


def _still_serves(llm):
    r = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert len(r.token_ids) == 4
    assert llm.engine.pool.num_free == llm.engine.num_blocks
    assert not llm.engine.has_unfinished()


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    d = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        LLM(str(d))


def test_block_size_must_be_a_power_of_two(tiny_model_dir):
    from kvloom.errors import KvloomError
    with pytest.raises(KvloomError, match="block_size must be a power of two, got 12"):
        LLM(tiny_model_dir("llama"), block_size=12)


def test_truncated_weights(tiny_model_dir, tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_model_dir("llama"), d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: os.path.getsize(f) // 2])
    with pytest.raises(WeightsError):
        LLM(str(d))


def test_mismatched_weights(tiny_model_dir, tmp_path):
    d = tmp_path / "mismatch"
    shutil.copytree(tiny_model_dir("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="shape"):
        LLM(str(d))


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(llm, prompt):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([prompt])
    _still_serves(llm)


def test_prompt_longer_than_context(llm):
    with pytest.raises(PromptTooLongError, match="at most 128"):
        llm.generate(random_prompts(1, [128]))
    _still_serves(llm)


def test_token_ids_outside_vocab(llm):
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[1, 2, 100000]])
    _still_serves(llm)


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": -1}, "max_tokens"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.5}, "temperature"), ({"top_k": -3}, "top_k"), ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"n": 0}, "n"), ({"logprobs": 50}, "logprobs"),
])
def test_invalid_sampling_values(llm, kwargs, field):
    with pytest.raises(InvalidSamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)
    _still_serves(llm)


def test_bad_prompt_in_a_batch_changes_nothing(llm):
    # The second prompt is bad: nothing is queued, nothing leaks, and the next call works.
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6, 7], [], [8, 9]], SamplingParams(max_tokens=4))
    _still_serves(llm)
