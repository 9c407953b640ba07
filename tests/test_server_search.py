"""Beam search and guided search through the OpenAI-compatible server, with the official openai client: the
search programs (kvloom/scaling/search.py) run on the engine thread between steps and give what they give
offline (beam search: what transformers gives in the float32 reference mode); bad settings are 400s; a client
that leaves or an error mid-search aborts every sample; nothing leaks; other requests are served alongside."""
from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import random_prompts
from server_harness import ServerThread, tiny_engine
from test_beam_search import hf_beams
from test_server import _no_leak

from kvloom.engine.faults import FaultPlan
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.process_reward import ProcessReward

MAX_LEN = 256
MSGS = [{"role": "user", "content": "What is two plus two?"}]
GRADER = {"template": "Q: {question}\nA: {answer}\nIs it right?", "positive": "yes"}
BEAM = {"use_beam_search": True, "beam_width": 3}


class StepRecorder:
    """Wraps engine.step: which requests (parent ids) each step ran, and an optional sleep that makes a
    search last long enough to walk away from or to run something beside."""

    def __init__(self, engine):
        self.steps: list[set[str]] = []
        self.seconds = 0.0
        step = engine.step

        def recorded():
            if self.seconds:
                time.sleep(self.seconds)
            outs = step()
            self.steps.append({o.parent_id for o in outs})
            return outs
        engine.step = recorded


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"), max_model_len=MAX_LEN)
    recorder = StepRecorder(engine)
    with ServerThread(engine) as s:
        s.recorder = recorder
        yield s


@pytest.fixture
def server(served):
    served.recorder.seconds = 0.0
    served.recorder.steps.clear()
    yield served
    served.engine.faults = None
    _no_leak(served)          # every block back in the free pool, nothing left running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    """The offline reference: its own engine over the same model."""
    from kvloom import LLM
    return LLM(tiny_model_dir("llama"), kv_cache_memory="4MiB", max_model_len=MAX_LEN)


def same_report(a: dict, b: dict) -> bool:
    """Two searches' `kvloom` objects agree: batched with other requests, logprobs may differ in their last
    bits (the engine's tokens are batch-invariant, its logprobs to ~1e-7), so the scores are compared to 1e-6."""
    return ({k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
            and a["scores"] == pytest.approx(b["scores"], rel=1e-6, abs=1e-6))


# ---- beam search ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,n,length_penalty", [(3, 2, 1.0), (4, 4, 0.0)])
def test_beam_search_on_completions_equals_transformers_and_offline(client, llm, tiny_model_dir, width, n,
                                                                    length_penalty):
    prompt = random_prompts(1, [17], seed=width)[0]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, n=n, extra_body={
        "use_beam_search": True, "beam_width": width, "length_penalty": length_penalty})
    ext = got.model_extra["kvloom"]
    ref_tokens, ref_scores = hf_beams(tiny_model_dir("llama"), prompt, width, n, length_penalty, 10)
    assert [c.index for c in got.choices] == list(range(n))
    # (transformers pads a hypothesis that ended early with special ids, which decoding drops)
    assert [c.text for c in got.choices] == [llm.tokenizer.decode(t) for t in ref_tokens]
    assert ext["strategy"] == "beam_search" and ext["scores"] == pytest.approx(ref_scores, abs=1e-4)
    offline = llm.generate([prompt], SamplingParams(n=n, max_tokens=10), use_beam_search=True, beam_width=width,
                           length_penalty=length_penalty)[0]
    assert [c.text for c in got.choices] == [o.text for o in offline.outputs]
    assert [c.finish_reason for c in got.choices] == [o.finish_reason for o in offline.outputs]
    assert ext == offline.kvloom
    # the first step draws for the prompt, each later one for every running beam
    assert 10 < got.usage.completion_tokens == ext["completion_tokens"] <= 1 + width * 9


def test_beam_search_on_chat_equals_offline_with_logprobs(client, llm):
    got = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, n=2, logprobs=True,
                                         top_logprobs=2, extra_body={**BEAM, "beam_width": 4, "length_penalty": 0.5})
    offline = llm.generate([llm.tokenizer.apply_chat_template(MSGS)], SamplingParams(n=2, max_tokens=8, logprobs=2),
                           use_beam_search=True, beam_width=4, length_penalty=0.5)[0]
    ext = got.model_extra["kvloom"]
    assert [c.message.content or "" for c in got.choices] == [o.text for o in offline.outputs]
    assert ext == offline.kvloom
    for c, o, score in zip(got.choices, offline.outputs, ext["scores"]):
        lps = [x.logprob for x in c.logprobs.content]
        assert lps == [x.logprob for x in o.logprobs] and len(lps) == len(o.token_ids)
        assert all(len(x.top_logprobs) == 2 for x in c.logprobs.content)
        assert sum(lps) / len(lps) ** 0.5 == pytest.approx(score, rel=1e-5)   # the hypothesis' own score


def test_beam_search_over_several_prompts(client):
    prompts = ["Compound statements", "The with statement"]
    both = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, extra_body=BEAM)
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=6, extra_body=BEAM) for p in prompts]
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    reports = both.model_extra["kvloom"]["prompts"]
    assert len(reports) == 2 and all(same_report(r, a.model_extra["kvloom"]) for r, a in zip(reports, alone))


def test_a_normal_request_runs_alongside_a_beam_search(server, client):
    normal = dict(model="tiny", prompt="The with statement", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    beam = dict(model="tiny", prompt="Compound statements", max_tokens=24, n=2, extra_body=BEAM)
    normal_alone, beam_alone = client.completions.create(**normal), client.completions.create(**beam)
    server.recorder.seconds = 0.01
    server.recorder.steps.clear()
    with ThreadPoolExecutor(2) as pool:
        searched = pool.submit(client.completions.create, **beam)
        deadline = time.time() + 10
        while not server.engine.has_unfinished() and time.time() < deadline:
            time.sleep(0.002)
        plain = pool.submit(client.completions.create, **normal)
        searched, plain = searched.result(60), plain.result(60)
    assert any({searched.id, plain.id} <= step for step in server.recorder.steps)   # in the same steps
    assert plain.choices[0].text == normal_alone.choices[0].text
    assert [c.text for c in searched.choices] == [c.text for c in beam_alone.choices]
    assert same_report(searched.model_extra["kvloom"], beam_alone.model_extra["kvloom"])


# ---- guided search ---------------------------------------------------------------------------------------

def test_guided_search_on_completions_equals_offline(client, llm):
    prompt = "Compound statements"
    settings = {"particles": 4, "step_tokens": 3, "temperature": 0.5, "seed": 7}
    params = dict(max_tokens=9, n=2, temperature=1.0, seed=3)
    got = client.completions.create(model="tiny", prompt=prompt, **params, extra_body={
        "ignore_eos": True, "guided_search": {**settings, "scorer": GRADER}})
    scorer = ProcessReward(prompt, GRADER["template"], GRADER["positive"])
    offline = llm.generate(prompt, SamplingParams(**params, ignore_eos=True), guided=settings, scorer=scorer)[0]
    ext = got.model_extra["kvloom"]
    assert [c.text for c in got.choices] == [o.text for o in offline.outputs]
    assert ext == offline.kvloom and ext["strategy"] == "guided_search"
    # resampled after 3 and 6 tokens (4 gradings each), then each of the 4 finished particles graded once
    assert ext["rounds"] == 2 and ext["particles_finished"] == 4 and ext["grading_requests"] == 12
    assert ext["scores"] == sorted(ext["scores"], reverse=True)
    assert got.usage.completion_tokens == ext["completion_tokens"] >= 9 * 4
    # a returned particle's score is the served model's log P(yes) after the grading prompt on its final text
    yes = {llm.tokenizer.hf.encode(w, add_special_tokens=False)[0] for w in ("yes", " yes")}
    for c, score in zip(got.choices, ext["scores"]):
        graded = llm.generate([scorer.prompt_ids(llm.tokenizer, c.text)],
                              SamplingParams(max_tokens=1, temperature=0, logprobs=20), use_tqdm=False)[0]
        top = graded.logprobs[0].top
        p = sum(math.exp(lp) for t, lp in top if t in yes)
        assert score == pytest.approx(math.log(p) if p else top[-1][1], abs=1e-6)


def test_guided_search_on_chat_with_the_default_grader(client, llm):
    settings = {"particles": 3, "step_tokens": 2, "seed": 1}
    got = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, seed=5,
                                         extra_body={"guided_search": settings})
    offline = llm.generate([llm.tokenizer.apply_chat_template(MSGS)], SamplingParams(max_tokens=6, seed=5),
                           guided=settings, scorer=ProcessReward(MSGS[-1]["content"]))[0]
    assert [c.message.content or "" for c in got.choices] == [o.text for o in offline.outputs]
    assert got.model_extra["kvloom"] == offline.kvloom and len(got.choices) == 1


# ---- leaving, failing, refusing ---------------------------------------------------------------------------

SEARCHES = [pytest.param({"use_beam_search": True, "beam_width": 4}, id="beam"),
            pytest.param({"guided_search": {"particles": 4, "step_tokens": 4, "scorer": GRADER}}, id="guided")]


@pytest.mark.parametrize("extra", SEARCHES)
def test_client_disconnect_aborts_every_sample_of_the_search(server, extra):
    server.recorder.seconds = 0.02
    body = {"model": "tiny", "prompt": "Long story:", "max_tokens": 100, "ignore_eos": True, **extra}
    seen = {}

    async def walk_away():
        async with httpx.AsyncClient(timeout=30) as h:
            task = asyncio.create_task(h.post(server.url + "/v1/completions", json=body))
            deadline = time.time() + 20
            while len(server.engine.scheduler.requests) < 4 and time.time() < deadline:   # the family forked
                await asyncio.sleep(0.01)
            seen["samples"] = len(server.engine.scheduler.requests)
            seen["blocks"] = server.engine.pool.num_blocks - server.engine.pool.num_free
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    asyncio.run(walk_away())
    assert seen["samples"] >= 4 and seen["blocks"] > 0
    _no_leak(server)
    # ended when the client left: run to its end, the search would have stepped its samples 100 times
    assert sum(any("-grade" not in p for p in step) for step in server.recorder.steps) < 100


@pytest.mark.parametrize("extra", SEARCHES)
def test_an_engine_error_mid_search_ends_it_and_the_server_goes_on(server, client, extra):
    server.engine.faults = FaultPlan("sampler@4")      # the 4th step from now fails: the search's samples end
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="tiny", prompt="Long story:", max_tokens=30, extra_body={
            "ignore_eos": True, **extra})
    assert e.value.body["code"] == "request_failed"
    _no_leak(server)
    assert client.completions.create(model="tiny", prompt="after", max_tokens=3, extra_body=BEAM).choices


@pytest.mark.parametrize("body,field", [
    ({**BEAM, "beam_width": 11}, "beam_width"),
    ({**BEAM, "beam_width": 0}, "beam_width"),
    ({**BEAM, "n": 3, "beam_width": 2}, "n"),
    ({"use_beam_search": True, "n": 2}, None),          # beam_width defaults to n (vLLM's server): accepted
    ({**BEAM, "best_of": 3}, "use_beam_search"),
    ({**BEAM, "vote": {"extract": "x", "n": 3}}, "use_beam_search"),
    ({**BEAM, "stream": True}, "stream"),
    ({**BEAM, "temperature": 0.7}, "temperature"),
    ({**BEAM, "top_p": 0.5}, "top_p"),
    ({**BEAM, "stop": ["x"]}, "use_beam_search"),
    ({**BEAM, "structured_outputs": {"choice": ["a", "b"]}}, "use_beam_search"),
    ({**BEAM, "length_penalty": "long"}, "length_penalty"),
    ({**BEAM, "length_penalty": 1e6}, "length_penalty"),
    ({**BEAM, "session_id": "s1"}, "session_id"),
    ({**BEAM, "guided_search": {}}, "guided_search"),
    ({"length_penalty": 2.0}, "length_penalty"),
    ({"beam_width": 2}, "beam_width"),
    ({"guided_search": {"particles": 0}}, "guided_search.particles"),
    ({"guided_search": {"particles": 1000}}, "guided_search.particles"),   # above max_num_seqs
    ({"guided_search": {"particles": 2, "k": 1}}, "guided_search"),
    ({"guided_search": {"temperature": 0}}, "guided_search.temperature"),
    ({"guided_search": {"step_tokens": 0}}, "guided_search.step_tokens"),
    ({"guided_search": {}, "temperature": 0}, "temperature"),
    ({"guided_search": {"particles": 2}, "n": 3}, "n"),
    ({"guided_search": {"scorer": "judge"}}, "guided_search.scorer"),
    ({"guided_search": {"scorer": {"template": "no slot"}}}, "guided_search.scorer.template"),
    ({"guided_search": {"scorer": {"name": "other-model"}}}, "guided_search.scorer.name"),
    ({"guided_search": {}, "adaptive": {"max_n": 4}}, "guided_search"),
    ({"guided_search": {}, "structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
    ({"guided_search": {}, "max_tokens": 250}, "max_tokens"),     # the grading prompt around it would not fit
    ({"guided_search": "yes"}, "guided_search"),
])
def test_bad_search_settings_are_400_on_both_endpoints(server, body, field):
    for path, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": MSGS})):
        r = httpx.post(server.url + path, json={"model": "tiny", "max_tokens": 2, **base, **body}, timeout=60)
        if field is None:
            assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
            continue
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == field, (path, r.json())
