"""Injected faults (kvloom/engine/faults.py): a fault ends only the requests it touches, frees their KV, and
everyone else's tokens stay exactly what they are without it."""
import httpx
import openai
import pytest

from kvloom.engine.faults import ENV, FaultPlan
from kvloom.sampling_params import SamplingParams
from server_harness import ServerThread, tiny_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8, 9], "b": [10, 11, 12, 13], "c": [20, 21, 22, 23, 24, 25]}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return tiny_engine(tiny_model_dir("llama"), max_num_seqs=2)


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt's tokens when it runs by itself, with no fault anywhere."""
    out = {}
    for rid, prompt in PROMPTS.items():
        engine.add_request(prompt, GREEDY, request_id=f"ref-{rid}")
        out[rid] = _drain(engine)[f"ref-{rid}"].token_ids
    return out


def _drain(engine, plan: FaultPlan | None = None) -> dict:
    engine.faults = plan
    finals = {}
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
    finally:
        engine.faults = None
    return finals


def _assert_idle(engine):
    assert not engine.has_unfinished()
    assert engine.pool.num_used == 0, "a failed request kept KV blocks"
    assert not engine._states and not engine._family


@pytest.mark.parametrize("kind", ["runner", "sampler", "detokenizer"])
def test_a_fault_in_a_step_ends_only_that_steps_requests(engine, alone, kind):
    # max_num_seqs=2: a and b run, c waits. The fault hits step 2 (a and b decoding).
    for rid, prompt in PROMPTS.items():
        engine.add_request(prompt, GREEDY, request_id=rid)
    finals = _drain(engine, FaultPlan(f"{kind}@2"))
    assert {r: finals[r].finish_reason for r in "ab"} == {"a": "error", "b": "error"}
    assert kind in finals["a"].error or "InjectedFault" in finals["a"].error
    assert finals["c"].finish_reason == "length" and finals["c"].token_ids == alone["c"]
    _assert_idle(engine)


def test_nan_logits_end_that_request_only(engine, alone):
    for rid in "ab":
        engine.add_request(PROMPTS[rid], GREEDY, request_id=rid)
    finals = _drain(engine, FaultPlan("nan=b"))
    assert finals["b"].finish_reason == "error" and "non-finite" in finals["b"].error
    assert finals["a"].finish_reason == "length" and finals["a"].token_ids == alone["a"]
    _assert_idle(engine)


def test_nan_in_one_sample_ends_its_whole_request(engine, alone):
    sampled = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=8, ignore_eos=True)
    engine.add_request(PROMPTS["a"], sampled, request_id="fam")
    engine.add_request(PROMPTS["c"], GREEDY, request_id="c")
    finals = _drain(engine, FaultPlan("nan=fam#2"))
    # max_num_seqs=2: sample 0 finished before samples 1 and 2 got seats; the poisoned sample 2 ends them both.
    assert {rid: finals[rid].finish_reason for rid in ("fam", "fam#1", "fam#2")} == {
        "fam": "length", "fam#1": "error", "fam#2": "error"}
    assert finals["c"].token_ids == alone["c"]
    _assert_idle(engine)


def test_kv_exhaustion_preempts_and_never_fails(tiny_model_dir, engine):
    # 12 blocks for 6 requests of 68 tokens (5 blocks each): they cannot all fit, so the scheduler must preempt.
    block_bytes = engine.config.kv_cache_memory // engine.num_blocks
    small = tiny_engine(tiny_model_dir("llama"), kv_cache_memory=12 * block_bytes + block_bytes // 2, max_num_seqs=6)
    assert small.num_blocks == 12
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    prompts = [[3 + i, 4 + i, 5 + i, 6 + i, 7 + i, 8 + i, 9 + i, 10 + i] for i in range(6)]
    ref = {}
    for i, p in enumerate(prompts):
        small.add_request(p, params, request_id=f"ref{i}")
        ref[i] = _drain(small)[f"ref{i}"].token_ids
    for i, p in enumerate(prompts):
        small.add_request(p, params, request_id=f"r{i}")
    finals = _drain(small)
    assert small.scheduler.num_preemptions > 0
    assert all(finals[f"r{i}"].finish_reason == "length" and finals[f"r{i}"].token_ids == ref[i] for i in range(6))
    _assert_idle(small)


def test_fault_specs_are_checked():
    assert FaultPlan("runner@3, nan=req-1").faults[1].request_id == "req-1"
    for bad in ("runner", "explode@1", "runner@0", "nan="):
        with pytest.raises(ValueError, match=ENV):
            FaultPlan(bad)


# ---- through the server: a 500 or an error event, then normal service -------------------------------------

def test_server_answers_500_and_an_error_event_then_serves_on(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(ENV, "runner@3,sampler@20")
    engine = tiny_engine(tiny_model_dir("llama"))
    monkeypatch.delenv(ENV)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True, "temperature": 0}
    with ServerThread(engine) as s:
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)    # steps 1-3: fails at its third
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and "InjectedFault" in r.json()["error"]["message"]
        ok = httpx.post(s.url + "/v1/completions", json=body, timeout=30)   # steps 4-13
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError, match="InjectedFault"):   # steps 14-: the fault at 20, mid-stream
            for _ in client.completions.create(model="tiny", prompt=body["prompt"], max_tokens=10, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
                pass
        again = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert again.json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]
        assert httpx.get(s.url + "/health").status_code == 200
        assert engine.pool.num_used == 0


def test_engine_thread_death_turns_health_503_and_fails_clients(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(ENV, "loop@4")
    engine = tiny_engine(tiny_model_dir("llama"))
    monkeypatch.delenv(ENV)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True}
    with ServerThread(engine) as s:
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert httpx.get(s.url + "/health").status_code == 503
        late = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert late.status_code == 503
