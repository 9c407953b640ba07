"""`kvloom bench soak`: its judge of single answers, its counter cross-check, and a short soak of a real server."""
import asyncio
import json

import httpx
import pytest

from kvloom.bench.soak import SoakSettings, check_counters, run_soak
from kvloom.bench.soak_client import perform
from kvloom.bench.soak_mix import SoakRequest
from kvloom.bench.soak_server import parse_metrics, require_loopback

BASE = "http://127.0.0.1:1"


def _judge(req: SoakRequest, handler, timeout: float = 5.0):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as h:
            return await perform(h, BASE, req, timeout)
    return asyncio.run(go())


def _sse(*chunks, done=True) -> bytes:
    out = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    return (out + ("data: [DONE]\n\n" if done else "")).encode()


def _chunk(index, text="", finish=None):
    return {"choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}


def _completion(stream=False, n=1, behaviour="plain", **extra):
    return SoakRequest("completions", {"prompt": "x", "max_tokens": 4, "n": n, "stream": stream, **extra},
                       behaviour, "short", expect_status=(400,) if behaviour == "invalid" else ())


def _error(status, type_="invalid_request_error", headers=None):
    return httpx.Response(status, json={"error": {"message": "no", "type": type_, "param": None, "code": None}},
                          headers=headers)


def test_a_complete_stream_is_finished_and_one_without_done_is_lost():
    both = _sse(_chunk(0, "a"), _chunk(1, "b", "length"), _chunk(0, "", "stop"))
    assert _judge(_completion(True, n=2), lambda r: httpx.Response(200, content=both)).outcome == "finished"
    cut = _sse(_chunk(0, "a"), _chunk(0, "", "stop"), done=False)
    res = _judge(_completion(True), lambda r: httpx.Response(200, content=cut))
    assert (res.outcome, res.reason) == ("lost", "stream ended without [DONE] after 2 events")
    # [DONE] with a choice never finished, or an error event inside the 200: lost as well.
    half = _sse(_chunk(0, "a", "stop"))
    assert _judge(_completion(True, n=2), lambda r: httpx.Response(200, content=half)).outcome == "lost"
    err = _sse(_chunk(0, "a"), {"error": {"message": "boom", "type": "server_error"}})
    assert _judge(_completion(True), lambda r: httpx.Response(200, content=err)).outcome == "lost"


def test_rejections_need_an_error_body_and_503_needs_retry_after():
    busy = _judge(_completion(), lambda r: _error(503, "overloaded_error", {"Retry-After": "1"}))
    assert (busy.outcome, busy.reason) == ("rejected", "503 overloaded")
    assert _judge(_completion(), lambda r: _error(503, "overloaded_error")).outcome == "lost"
    assert _judge(_completion(), lambda r: _error(500, "server_error")).outcome == "lost"
    assert _judge(_completion(), lambda r: httpx.Response(400, text="bad")).outcome == "lost"
    # A 400 is a rejection only for a request the mix made invalid; an invalid request accepted is lost.
    assert _judge(_completion(), lambda r: _error(400)).outcome == "lost"
    assert _judge(_completion(behaviour="invalid"), lambda r: _error(400)).outcome == "rejected"
    ok = {"choices": [{"index": 0, "text": "a", "finish_reason": "stop", "logprobs": None}],
          "usage": {"completion_tokens": 1}}
    assert _judge(_completion(behaviour="invalid"), lambda r: httpx.Response(200, json=ok)).outcome == "lost"
    assert _judge(_completion(), lambda r: httpx.Response(200, json=ok)).outcome == "finished"


def test_json_answers_are_checked_choice_by_choice():
    def body(finish="stop", logprobs=None, n=1):
        return {"choices": [{"index": i, "text": "a", "finish_reason": finish, "logprobs": logprobs}
                            for i in range(n)], "usage": {"completion_tokens": n}}
    assert _judge(_completion(n=2), lambda r: httpx.Response(200, json=body(n=1))).outcome == "lost"
    assert _judge(_completion(), lambda r: httpx.Response(200, json=body(finish=None))).outcome == "lost"
    assert _judge(_completion(logprobs=2), lambda r: httpx.Response(200, json=body())).outcome == "lost"
    lp = {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.5, "b": -1.0}], "text_offset": [0]}
    assert _judge(_completion(logprobs=2), lambda r: httpx.Response(200, json=body(logprobs=lp))).outcome == "finished"
    assert _judge(_completion(logprobs=1), lambda r: httpx.Response(200, json=body(logprobs=lp))).outcome == "lost"


def test_a_client_that_gives_up_is_cancelled_and_a_silent_server_is_lost():
    async def slow(request):
        await asyncio.sleep(2)
        return _error(500)
    req = _completion()
    req.abort_after = 0.05
    assert _judge(req, slow).outcome == "cancelled"
    res = _judge(_completion(), slow, timeout=0.1)
    assert res.outcome == "lost" and "within" in res.reason


def test_counter_check_bounds():
    tally = {"finished": 10, "finished_choices": 14, "cancelled": 3, "cancelled_choices": 5, "overloaded": 4,
             "lost": 0, "lost_choices": 0}
    # Success counted per choice, two hang-ups seen as aborts and one as a success: consistent.
    assert check_counters(tally, {"success": 15, "abort": 2, "rejected": 4})["ok"]
    # Hang-ups that left no trace, fewer successes than finished requests, a 503 not counted, an error
    # outcome: each caught.
    assert not check_counters(tally, {"success": 10, "abort": 0, "rejected": 4})["checks"]["every_request_counted"]
    assert not check_counters(tally, {"success": 9, "abort": 3, "rejected": 4})["checks"]["success"]
    assert not check_counters(tally, {"success": 15, "abort": 2, "rejected": 3})["ok"]
    assert not check_counters(tally, {"success": 15, "abort": 2, "rejected": 4, "error": 1})["ok"]


def test_metrics_parsing_and_loopback_only():
    snap = parse_metrics('kvloom_requests_total{outcome="success"} 3.0\nkvloom_num_requests_running 1.0\n'
                         "kvloom_kv_cache_blocks_used 0.0\n")
    assert snap.outcomes == {"success": 3.0} and not snap.idle
    require_loopback("http://127.0.0.1:8000")
    require_loopback("http://localhost:8000/")
    with pytest.raises(ValueError):
        require_loopback("http://10.0.0.7:8000")


@pytest.mark.timeout(900)   # a first start on a machine compiles the kernels
def test_short_soak_of_a_real_server(tiny_model_dir, tmp_path):
    s = SoakSettings(model=tiny_model_dir("llama"), duration=25, warmup=5, concurrency=6, seed=1,
                     max_waiting_requests=16, burst_interval=6, request_timeout=90,
                     serve_args="--kv-cache-memory 64MiB", server_log=str(tmp_path / "server.log"), progress=False)
    r = run_soak(s)
    tally, reasons = r["tally"], r["requests"]["reasons"]
    detail = json.dumps({k: r[k] for k in ("checks", "tally", "idle", "server_counters")}, default=str)
    assert tally["lost"] == 0, r["requests"]["lost_examples"]
    # Not vacuous: each outcome class happened (503s from the bursts, hang-ups mid-stream).
    assert tally["finished"] > 0 and tally["overloaded"] > 0, detail
    assert reasons["cancelled"].get("disconnect", 0) > 0, detail
    assert r["idle"]["clean"] and r["idle"]["kvloom_kv_cache_blocks_used"] == 0, detail
    assert r["server_counters"]["ok"], detail
    assert r["server"]["exit_code"] == 0 and r["server"]["tracebacks"] == 0, r["server"]
    assert r["passed"], detail
