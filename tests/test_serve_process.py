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
