"""Inference-time scaling strategies (kvloom/scaling): best-of-N, self-consistency votes, adaptive sampling;
offline through LLM.generate and on both server endpoints through the official openai client."""
from __future__ import annotations

import re
from collections import Counter

import openai
import pytest
from conftest import random_prompts
from test_server import _no_leak, client, server  # noqa: F401 - the server fixtures, shared

from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.answers import extract_answer, leader_posterior, majority
from kvloom.scaling.spec import ScalingSpec

# ---- mechanics without a model ------------------------------------------------------------------------


def test_answer_extraction_takes_the_last_match_and_its_group():
    p = re.compile(r"answer is (-?\d+)")
    assert extract_answer("the answer is 3, no, the answer is -12.", p) == "-12"
    assert extract_answer("no number here", p) is None
    assert extract_answer("  whole text \n", None) == "whole text"
    assert extract_answer("x = 42", re.compile(r"\d+")) == "42"


def test_majority_and_posterior():
    winner, counts = majority(["7", None, "5", "7", "5"])
    assert winner == "7" and counts == Counter({"7": 2, "5": 2})     # ties: the earliest drawn wins
    assert majority([None, None]) == (None, Counter())
    assert leader_posterior(Counter({"a": 4})) == pytest.approx(31 / 32)
    assert leader_posterior(Counter({"a": 3, "b": 1})) == pytest.approx(13 / 16)
    assert leader_posterior(Counter({"a": 5, "b": 5})) == pytest.approx(0.5)
    more = [leader_posterior(Counter({"a": k, "b": 2})) for k in range(2, 9)]
    assert more == sorted(more)


@pytest.mark.parametrize("kwargs,field", [
    (dict(n=3, best_of=2), "best_of"),
    (dict(best_of=0), "best_of"),
    (dict(best_of=10_000), "best_of"),
    (dict(best_of=4, scorer="nope"), "scorer"),
    (dict(scorer="logprob"), "scorer"),
    (dict(vote={"extract": "(", "n": 4}), "vote.extract"),
    (dict(vote={"n": 4}), "vote.extract"),
    (dict(vote={"extract": r"\d+", "n": 4, "k": 1}), "vote"),
    (dict(n=2, vote={"extract": r"\d+", "n": 4}), "n"),
    (dict(adaptive={"max_n": 8, "confidence": 1.5}), "adaptive.confidence"),
    (dict(adaptive={"confidence": 0.9}), "adaptive.max_n"),
    (dict(adaptive={"max_n": 8}, vote={"extract": "x", "n": 4}), "vote.n"),
    (dict(adaptive={"max_n": 8}, best_of=3), "adaptive"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        ScalingSpec.from_fields(**kwargs)
    assert e.value.field == field


def test_no_scaling_when_best_of_equals_n():
    assert ScalingSpec.from_fields(n=2, best_of=2) is None
    assert ScalingSpec.from_fields() is None


# ---- offline: LLM.generate ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from kvloom import LLM
    return LLM(tiny_model_dir("llama"), kv_cache_memory="4MiB")


def _engine_empty(engine):
    assert not engine.has_unfinished() and engine.pool.num_free == engine.pool.num_blocks


PROMPTS = random_prompts(3, [12, 30, 45], seed=9)
SAMPLED = SamplingParams(temperature=1.0, seed=21, max_tokens=10, ignore_eos=True)


def test_best_of_returns_the_top_n_by_cumulative_logprob(llm):
    ref = llm.generate(PROMPTS, SamplingParams(**{**_fields(SAMPLED), "n": 6, "logprobs": 0}), use_tqdm=False)
    got = llm.generate(PROMPTS, SamplingParams(**{**_fields(SAMPLED), "n": 2}), best_of=6)
    for r, g in zip(ref, got):
        ranked = sorted(r.outputs, key=lambda o: -sum(lp.logprob for lp in o.logprobs))
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in ranked[:2]]
        assert g.outputs[0].logprobs is None                 # not asked for: not returned
        assert len(g.kvloom["scores"]) == 6 and g.kvloom["samples_used"] == 6
        assert g.kvloom["completion_tokens"] == 60
    _engine_empty(llm.engine)


def test_best_of_with_a_callable_scorer(llm):
    seen = []

    def longest_text(prompt, text):
        seen.append(prompt)
        return len(text)

    got = llm.generate(PROMPTS[:1], SAMPLED, best_of=5, scorer=longest_text)[0]
    ref = llm.generate(PROMPTS[:1], SamplingParams(**{**_fields(SAMPLED), "n": 5}), use_tqdm=False)[0]
    assert got.text == max((o.text for o in ref.outputs), key=len)
    assert seen == [PROMPTS[0]] * 5


def test_vote_returns_the_majority_answer_and_its_first_sample(llm):
    pattern = r"^(.)"        # a random model: the first character is the "answer"
    got = llm.generate(PROMPTS, SAMPLED, vote={"extract": pattern, "n": 8})
    ref = llm.generate(PROMPTS, SamplingParams(**{**_fields(SAMPLED), "n": 8}), use_tqdm=False)
    for r, g in zip(ref, got):
        answers = [extract_answer(o.text, re.compile(pattern)) for o in r.outputs]
        winner, counts = majority(answers)
        vote = g.kvloom["vote"]
        assert vote["answer"] == winner and vote["counts"] == dict(counts)
        assert vote["share"] == pytest.approx(counts[winner] / 8)
        assert g.text == r.outputs[answers.index(winner)].text and len(g.outputs) == 1
    _engine_empty(llm.engine)


def test_adaptive_stops_once_sure_and_aborts_the_round(llm):
    """Every sample has the same "answer" (the empty match at the start): the leader's posterior passes 0.95
    at the 4th sample; the round's other 4 are aborted, and no round follows."""
    got = llm.generate(PROMPTS, SAMPLED, adaptive={"max_n": 32, "confidence": 0.95, "round": 8, "extract": r"\A"})
    for g in got:
        assert g.kvloom["samples_used"] == 4 and g.kvloom["samples_aborted"] == 4
        assert g.kvloom["stopped_early"] and g.kvloom["vote"]["posterior"] >= 0.95
    _engine_empty(llm.engine)


def test_adaptive_draws_rounds_up_to_max_n_when_answers_disagree(llm):
    got = llm.generate(PROMPTS[:2], SAMPLED, adaptive={"max_n": 12, "confidence": 0.999, "round": 4},
                       vote={"extract": r"(.)$"})
    for g in got:
        assert g.kvloom["samples_used"] == 12 and g.kvloom["samples_aborted"] == 0
        assert sum(g.kvloom["vote"]["counts"].values()) + g.kvloom["vote"]["no_answer"] == 12
        assert not g.kvloom["stopped_early"]
    # rounds are seeded as one family of max_n samples: the same samples as n=12 at once
    ref = llm.generate(PROMPTS[:2], SamplingParams(**{**_fields(SAMPLED), "n": 12}), use_tqdm=False)
    for r, g in zip(ref, got):
        answers = [extract_answer(o.text, re.compile(r"(.)$")) for o in r.outputs]
        assert g.kvloom["vote"]["counts"] == dict(majority(answers)[1])
    _engine_empty(llm.engine)


def _fields(p: SamplingParams) -> dict:
    return dict(temperature=p.temperature, seed=p.seed, max_tokens=p.max_tokens, ignore_eos=p.ignore_eos)


# ---- the server (test_server's fixtures): both endpoints, the kvloom object, 400s ------------------------

MSGS = [{"role": "user", "content": "What is two plus two?"}]


def test_server_best_of_on_completions(client, server):
    kw = dict(model="tiny", prompt="Once upon", max_tokens=8, temperature=1.0, seed=5,
              extra_body={"ignore_eos": True})
    ref = client.completions.create(**kw, n=4, logprobs=0)
    got = client.completions.create(**kw, n=2, best_of=4)
    ranked = sorted(ref.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.text for c in got.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in got.choices] == [0, 1] and got.choices[0].logprobs is None
    assert got.usage.completion_tokens == 32              # every drawn token counts
    ext = got.model_extra["kvloom"]
    assert ext["strategy"] == "best_of" and len(ext["scores"]) == 4


def test_server_vote_and_adaptive_on_chat(client, server):
    kw = dict(model="tiny", messages=MSGS, max_tokens=8, temperature=1.0, seed=3)
    voted = client.chat.completions.create(**kw, extra_body={"vote": {"extract": r"(\w)", "n": 6}})
    ext = voted.model_extra["kvloom"]
    assert set(ext["vote"]) >= {"answer", "share", "counts"} and ext["samples_used"] == 6
    assert len(voted.choices) == 1
    if ext["vote"]["answer"] is not None:
        assert re.findall(r"(\w)", voted.choices[0].message.content)[-1] == ext["vote"]["answer"]
    adaptive = client.chat.completions.create(**kw, extra_body={
        "adaptive": {"max_n": 16, "confidence": 0.9, "round": 4, "extract": r"\A"}})
    ext = adaptive.model_extra["kvloom"]
    # the same (empty) answer 3 times: posterior 15/16 >= 0.9 (2 times: 7/8); the round's 4th is aborted
    assert ext["samples_used"] == 3 and ext["samples_aborted"] == 1 and ext["stopped_early"]
    _no_leak(server)


@pytest.mark.parametrize("body,field", [
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"vote": {"extract": "(", "n": 4}}, "vote.extract"),
    ({"vote": {"extract": "x", "n": 4}, "stream": True}, "stream"),
    ({"adaptive": {"max_n": 4, "confidence": 2}}, "adaptive.confidence"),
    ({"best_of": 3, "scorer": "judge-me"}, "scorer"),
])
def test_server_bad_scaling_settings_are_400(client, server, body, field):
    for call in (lambda: client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2, extra_body=body),
                 lambda: client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body=body)):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["param"] == field, e.value.body
    _no_leak(server)
