"""`kvloom serve` with several models: flags parsed, impossible combinations refused before anything loads."""
from kvloom.cli import main


def test_what_a_cluster_cannot_run_is_refused_before_anything_loads(capsys):
    """Several models with --instances are served (tests/test_cluster_multi_model.py); fine-tuning on a cluster
    and fewer than one instance are not, and the paths x and y are never read."""
    assert main(["serve", "--model", "a=x", "--model", "b=y", "--instances", "2", "--enable-fine-tuning"]) == 2
    assert "fine-tuning" in capsys.readouterr().err
    assert main(["serve", "--model", "a=x", "--model", "b=y", "--instances", "0"]) == 2
    assert "--instances" in capsys.readouterr().err


def test_path_and_named_models_together_are_refused(capsys):
    assert main(["serve", "somepath", "--model", "a=x", "--model", "b=y"]) == 2
    assert "not both" in capsys.readouterr().err


def test_duplicate_names_and_bad_routes_are_refused(capsys):
    assert main(["serve", "--model", "a=x", "--model", "a=y"]) == 2
    assert "different" in capsys.readouterr().err
    assert main(["serve", "--model", "a=x", "--model", "b=y", "--route", "r=greedy"]) == 2
    assert "--route" in capsys.readouterr().err


def test_serve_several_models_as_a_process(tiny_model_dir):
    import httpx
    from server_harness import free_port
    from test_serve_process import _start, _stop
    port = free_port()
    proc, log = _start(["--model", f"small={tiny_model_dir('llama')}", "--model", f"big={tiny_model_dir('qwen2')}",
                        "--max-loaded-models", "1", "--route", "c=cascade,threshold=inf",
                        "--kv-cache-memory", "64MiB"], port)
    try:
        url = f"http://127.0.0.1:{port}"
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids == ["small", "big", "c", "auto"]
        for name in ("big", "small"):
            r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 3}, timeout=60)
            assert r.json()["model"] == name
        r = httpx.post(url + "/v1/completions", json={"model": "c", "prompt": "x", "max_tokens": 3}, timeout=60)
        assert r.json()["kvloom"]["route"]["model"] == "big"
    finally:
        code = _stop(proc)
    text = "".join(log)
    assert code == 0, text
    assert "torch threads" in text and "unloaded to make room" in text
