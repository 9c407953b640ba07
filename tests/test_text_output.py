"""Incremental detokenizing, stop strings and stop tokens, streaming deltas."""
import pytest

from kvloom import LLM, SamplingParams
from kvloom.detokenizer import IncrementalDetokenizer
from kvloom.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"))


@pytest.mark.parametrize("text", ["héllo wörld — naïve café", "日本語のテキスト and emoji 🎉🚀 mixed", "  leading spaces\n\ttabs"])
def test_deltas_concatenate_to_full_decode(llm, text):
    tok: Tokenizer = llm.tokenizer
    ids = tok.encode(text)
    assert len(ids) > len(text) // 4  # multi-byte characters span several byte-level tokens
    detok = IncrementalDetokenizer(tok, prompt_token_ids=tok.encode("Prompt:"))
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def _stream(llm, prompt, params):
    engine = llm.engine
    engine.add_request(prompt, params)
    deltas, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.delta_text)
            last = out
    return deltas, last


def test_stop_string_is_cut_and_never_streamed(llm):
    base = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[4:7]
    deltas, last = _stream(llm, [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop],
                                                             ignore_eos=True))
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert last.text == base.text[:base.text.index(stop)]
    assert "".join(deltas) == last.text
    assert llm.engine.pool.num_free == llm.engine.num_blocks


def test_stop_token_ids_and_max_tokens(llm):
    base = llm.generate([[9, 10, 11]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    target = base.token_ids[5]
    first = base.token_ids.index(target)
    r = llm.generate([[9, 10, 11]], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[target],
                                                   ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.token_ids == base.token_ids[:first + 1]


def test_logprobs(llm):
    r = llm.generate([[5, 6]], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3))[0]
    assert len(r.logprobs) == len(r.token_ids)
    for tok, lp in zip(r.token_ids, r.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.logprob == pytest.approx(lp.top[0][1])  # greedy: the top token
        assert lp.logprob <= 0


def test_streamed_deltas_equal_final_text(llm):
    deltas, last = _stream(llm, "The grammar of", SamplingParams(temperature=0.8, seed=3, max_tokens=40))
    assert "".join(deltas) == last.text == llm.tokenizer.decode(
        [t for t in last.token_ids if t not in llm.tokenizer.eos_token_ids])


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    rids = [engine.add_request([5 + i] * 20, SamplingParams(max_tokens=50, ignore_eos=True)) for i in range(4)]
    for _ in range(5):
        engine.step()
    assert engine.pool.num_free < engine.num_blocks
    for rid in rids[:2]:
        assert engine.abort_request(rid)
    assert not engine.abort_request("no-such-request")
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.num_free == engine.num_blocks


def test_penalties_change_greedy_output(llm):
    plain = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    assert len(set(plain.token_ids)) < 20  # the tiny model repeats itself
    pen = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                   frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))
