"""Benchmark metrics on synthetic timestamps, and `kvloom bench serve` against a live tiny server."""
import json

import numpy as np
import pytest

from kvloom.bench.metrics import RequestRecord, parse_slo, summarize
from kvloom.bench.serve import load_tokenizer
from kvloom.bench.workloads import arrivals, read_trace, find_trace, synthetic_workload
from kvloom.cli import main
from server_harness import ServerThread, tiny_engine


def _rec(start, first, end, tokens, chunks=None):
    r = RequestRecord(input_len=10, output_len_asked=tokens, start=start, first_token=first, end=end,
                      output_tokens=tokens, success=True)
    r.chunk_times = chunks or list(np.linspace(first, end, tokens))
    return r


def test_tpot_ttft_e2e_as_vllm_defines_them():
    r = _rec(0.0, 0.5, 2.5, 5)
    assert r.ttft == 0.5 and r.e2e == 2.5
    assert r.tpot == pytest.approx((2.5 - 0.5) / 4)
    assert r.itls == pytest.approx([0.5] * 4)
    assert _rec(0.0, 0.2, 0.2, 1).tpot is None


def test_percentiles_throughput_and_goodput():
    recs = [_rec(float(i), i + 0.1 * (i + 1), i + 0.1 * (i + 1) + 1.0, 11) for i in range(10)]
    recs.append(RequestRecord(5, 5, start=0.0, error="HTTP 503"))
    s = summarize(recs, duration=20.0, slos=parse_slo("ttft=550ms,tpot=150ms"))
    assert s["completed"] == 10 and s["failed"] == 1
    assert s["output_throughput"] == pytest.approx(110 / 20.0)
    ttfts = [0.1 * (i + 1) * 1000 for i in range(10)]
    assert s["ttft_ms"]["median"] == pytest.approx(np.median(ttfts))
    assert s["ttft_ms"]["p99"] == pytest.approx(np.percentile(ttfts, 99))
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["goodput"] == pytest.approx(5 / 20.0)  # ttft 0.1..0.5 s pass; every tpot is 100 ms
    assert s["errors"] == ["HTTP 503"]


def test_slo_parsing_and_arrivals():
    assert parse_slo("ttft=500ms, tpot=0.1s") == {"ttft": 0.5, "tpot": 0.1}
    with pytest.raises(ValueError):
        parse_slo("latency=fast")
    rng = np.random.default_rng(0)
    t = arrivals(4000, rate=4.0, burstiness=1.0, rng=rng)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.25, rel=0.1) and gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)
    bursty = np.diff(arrivals(4000, 4.0, 0.25, np.random.default_rng(0)))
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.15)  # CV = 1/sqrt(shape)
    assert (arrivals(5, float("inf"), 1.0, rng) == 0).all()


def test_each_seed_draws_its_own_prompt_text(tiny_model_dir):
    """Rounds of a benchmark use seeds 0, 1, ...: with the same text, a later round would find the earlier
    round's prompts in the prefix cache (and speculation its continuations in the global trie)."""
    tok = load_tokenizer(tiny_model_dir("llama"))

    def prompts(seed, kind="poisson"):
        return [r.prompt for r in synthetic_workload(tok, kind, 6, float("inf"), 1.0, 40, 8, 0.0, 400,
                                                     seed=seed).requests]

    assert prompts(3) == prompts(3)
    firsts = [{tuple(p[:16]) for p in prompts(s)} for s in (0, 1, 2)]
    assert not firsts[0] & firsts[1] and not firsts[1] & firsts[2] and not firsts[0] & firsts[2]
    assert all(len(p) == 40 for p in prompts(1))
    assert prompts(0, "repetitive") != prompts(1, "repetitive")


def test_real_traces_read():
    try:
        path = find_trace("burstgpt")
    except FileNotFoundError:
        pytest.skip("the shared workload traces (../shared/workloads) are not next to this checkout")
    rows = read_trace(path)
    assert len(rows) == 297 and rows[0][0] == 0.0 and all(o > 0 for _, _, o in rows)
    azure = read_trace(find_trace("azure-code"))
    assert len(azure) == 2000 and azure[-1][0] > 500


BURSTGPT_ROWS = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
26939,ChatGPT,29,69,98,Conversation log
27037,ChatGPT,136,74,210,Conversation log
27040,ChatGPT,0,0,0,Conversation log
27162,ChatGPT,229,12,241,Conversation log
27307,ChatGPT,326,66,392,Conversation log
"""


@pytest.mark.parametrize("workload", ["poisson", "trace", "shared-prefix", "repetitive"])
def test_bench_serve_against_kvloom(tiny_model_dir, tmp_path, workload, capsys):
    model = tiny_model_dir("llama")
    trace = tmp_path / "trace.csv"  # BurstGPT's columns; the real files are read in test_real_traces_read
    trace.write_text(BURSTGPT_ROWS)
    extra = ["--trace", str(trace)] if workload == "trace" else ["--workload", workload]
    with ServerThread(tiny_engine(model, max_model_len=200)) as s:
        out = tmp_path / "r.json"
        code = main(["bench", "serve", "--base-url", s.url, *extra, "--num-requests", "10",
                     "--request-rate", "20", "--input-len", "30", "--output-len", "12", "--prefix-len", "40",
                     "--time-scale", "10000", "--tokenizer", model, "--slo", "ttft=5s,tpot=1s", "--out", str(out)])
        assert code == 0
    result = json.loads(out.read_text())
    summ = result["summary"]
    assert summ["completed"] == (4 if workload == "trace" else 10) and summ["failed"] == 0
    assert summ["ttft_ms"]["p99"] >= summ["ttft_ms"]["median"] > 0
    assert summ["goodput"] > 0 and summ["total_output_tokens"] > 0
    assert result["server"]["engine_config"]["max_num_batched_tokens"] == 512
    assert result["server"]["torch_version"] and result["client"]["cpu_model"]
    if workload == "trace":  # the failed row (0 tokens) is not replayed; three rows exceed the 200-token context
        assert result["workload"]["num_requests"] == 4 and result["workload"]["clipped_to_context"] == 3
        assert result["workload"]["name"] == "trace.csv"
    if workload == "poisson":
        assert summ["total_output_tokens"] == 120  # ignore_eos: exactly max_tokens each
    assert (tmp_path / "r_timeline.png").stat().st_size > 1000
    assert "TTFT (ms)" in capsys.readouterr().out


def test_sweep_writes_curve(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    with ServerThread(tiny_engine(model, max_model_len=200)) as s:
        code = main(["bench", "sweep", "--base-url", s.url, "--rates", "5,inf", "--num-requests", "6",
                     "--input-len", "20", "--output-len", "8", "--tokenizer", model, "--out", str(tmp_path)])
        assert code == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["runs"]) == 2 and sweep["runs"][0]["rate"] == 5.0
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_offline_benchmarks_report_floor_and_roofline(tiny_model_dir):
    from kvloom import LLM
    from kvloom.bench.offline import run_latency, run_throughput, weight_bytes
    model = tiny_model_dir("llama")
    engine = LLM(model).engine
    lat = run_latency(engine, 16, 8, iters=1, warmup=0, bandwidth_gbs=10.0)
    floor = lat["memory_floor"]
    assert floor["weight_bytes"] == weight_bytes(engine)[0] and floor["kv_bytes"] > 0
    assert 0 < lat["fraction_of_memory_floor"] and lat["decode_tokens_per_s"] > 0
    thr = run_throughput(engine, 4, 16, 8, matmul_gflops=50.0)
    assert thr["output_tokens"] == 32 and thr["roofline"]["achieved_gflops"] > 0
    # weights read per step shrink with quantization: int8 weights plus float scales
    q = LLM(model, quantization="w8a8").engine
    assert weight_bytes(q)[0] < 0.5 * weight_bytes(engine)[0]
    assert weight_bytes(q)[1] == weight_bytes(engine)[1]


def test_tune_sweeps_the_grid_and_names_the_best(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    out = tmp_path / "tune.json"
    code = main(["tune", "--model", model, "--num-requests", "6", "--input-len", "20", "--output-len", "6",
                 "--max-num-seqs-grid", "2,6", "--budget-grid", "16,64", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [(r["max_num_seqs"], r["max_num_batched_tokens"]) for r in result["results"]] == [
        (2, 16), (2, 64), (6, 16), (6, 64)]
    best = result["best"]
    assert best["output_tokens_per_s"] == max(r["output_tokens_per_s"] for r in result["results"])
    assert "best: --max-num-seqs" in capsys.readouterr().out


def test_bench_spec_compares_both_engines(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--model", model, "--workload", "poisson", "--num-requests", "2",
                 "--input-len", "30", "--output-len", "12", "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["none"]["output_tokens"] == result["lookahead"]["output_tokens"] == 24
    assert result["decode_speedup"] > 0 and "acceptance_rate" in result["lookahead"]["speculation"]


def test_max_concurrency_one_sends_requests_one_at_a_time(tiny_model_dir, tmp_path):
    """Cold TTFT is measured one request at a time: no request starts before the previous one ends."""
    model = tiny_model_dir("llama")
    with ServerThread(tiny_engine(model, max_model_len=200)) as s:
        out = tmp_path / "r.json"
        code = main(["bench", "serve", "--base-url", s.url, "--workload", "poisson", "--num-requests", "5",
                     "--request-rate", "inf", "--max-concurrency", "1", "--input-len", "30", "--output-len", "6",
                     "--tokenizer", model, "--save-requests", "--out", str(out)])
        assert code == 0
    records = sorted(json.loads(out.read_text())["requests"], key=lambda r: r["start"])
    assert len(records) == 5 and all(r["success"] for r in records)
    assert all(later["start"] >= earlier["end"] for earlier, later in zip(records, records[1:]))
