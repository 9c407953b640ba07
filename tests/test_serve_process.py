"""`kvloom serve` as a user runs it: a real process, stopped with SIGTERM, exiting 0."""
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from server_harness import free_port


def _start(args, port):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvloom.cli", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("server exited early:\n" + "".join(log))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, log
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not come up:\n" + "".join(log))


def _stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_sigterm_lets_running_request_finish_then_exits_0(tiny_model_dir):
    port = free_port()
    proc, log = _start([tiny_model_dir("llama"), "--served-model-name", "tiny"], port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        result = {}

        def long_request():
            result["r"] = client.completions.create(model="tiny", prompt="stream", max_tokens=120, temperature=0,
                                                    extra_body={"ignore_eos": True})
        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.3)
    finally:
        code = _stop(proc)
    t.join(30)
    assert code == 0, "".join(log)
    assert result["r"].usage.completion_tokens == 120  # the running request was let finish
    text = "".join(log)
    assert "KV cache:" in text and "serving tiny at http://127.0.0.1" in text
    assert "made at start-up frozen out of full collections" in text


def test_the_start_up_heap_leaves_the_collectors_view():
    """What is alive when the server is built is frozen (server/heap.py): full collections no longer walk it,
    and what is made afterwards is collected as before."""
    import gc
    from kvloom.server.heap import freeze_startup_heap
    alive = [[i] for i in range(10_000)]
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(alive)
        walked = {id(o) for o in gc.get_objects()}
        assert not any(id(x) in walked for x in alive)
        later = [0]
        assert id(later) in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()


@pytest.mark.timeout(300)
def test_default_model_serves_chat():
    port = free_port()
    proc, log = _start([], port)  # no model argument: the built-in SmolLM2-135M-Instruct
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        assert model == "SmolLM2-135M-Instruct"
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2+2?"}],
                                           max_tokens=20, temperature=0)
        assert r.choices[0].message.content.strip()
        assert r.usage.completion_tokens <= 20
    finally:
        assert _stop(proc) == 0, "".join(log)


def test_sigkill_mid_request_then_restart_comes_back_clean(tiny_model_dir):
    # Nothing a killed server leaves behind (kernel build lock, GGUF metadata cache, the port) blocks the next.
    port = free_port()
    proc, _ = _start([tiny_model_dir("llama"), "--served-model-name", "tiny"], port)
    body = {"model": "tiny", "prompt": "stream", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())
        proc.kill()               # SIGKILL mid-stream: no shutdown code runs
        proc.wait(30)
    proc, log = _start([tiny_model_dir("llama"), "--served-model-name", "tiny"], port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        done = client.completions.create(model="tiny", prompt="again", max_tokens=5, temperature=0)
        assert done.choices[0].finish_reason in ("length", "stop")
    finally:
        assert _stop(proc) == 0, "".join(log)


def test_shutdown_refuses_new_work_and_lets_running_streams_finish(tiny_model_dir):
    from kvloom.server.launch import _CleanExitServer
    import uvicorn
    from server_harness import ServerThread, slowed, tiny_engine

    s = ServerThread(slowed(tiny_engine(tiny_model_dir("llama")), 0.02))
    s.server = _CleanExitServer(uvicorn.Config(s.app, host="127.0.0.1", port=s.port, log_level="warning"))
    s.thread = threading.Thread(target=s.server.run, daemon=True)
    with s:
        body = {"model": "tiny", "prompt": "stream", "max_tokens": 60, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line and not lines:
                    s.server.handle_exit(signal.SIGTERM, None)      # what uvicorn's signal handler calls
                    assert s.app.state.draining
                lines.append(line)
        assert "data: [DONE]" in lines, "the running stream was cut short"
        s.thread.join(30)
        assert not s.thread.is_alive()


def test_a_draining_server_answers_503_to_new_work(tiny_model_dir):
    from server_harness import ServerThread, tiny_engine
    with ServerThread(tiny_engine(tiny_model_dir("llama"))) as s:
        s.app.state.draining = True      # what SIGTERM sets: requests still reaching the app are refused
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(s.url + "/health").status_code == 503
        s.app.state.draining = False
