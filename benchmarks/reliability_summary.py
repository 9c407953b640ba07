"""The tables of docs/reliability.md, printed from the result files beside it (docs/results/reliability/).

    python benchmarks/reliability_summary.py            # paste the output into docs/reliability.md
"""
from __future__ import annotations

import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "reliability")


def _load(name: str) -> dict | None:
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.exists(path) else None


def fuzz_table(f: dict) -> str:
    rows = ["| run | cases | stateful steps | 5xx | hangs | failures | after: health, probe same, KV blocks | time |",
            "|---|---|---|---|---|---|---|---|"]
    for r in f["runs"]:
        a, t = r["after_run"], r["totals"]
        rows.append(f"| {'with API key' if r['api_key'] else 'no key'} | {t['cases']:,} | {r['stateful']['steps']} | "
                    f"{t['server_errors']} | {t['hangs']} | {t['failures']} | {a['health_status']}, "
                    f"{a['probe_matches_baseline']}, {a.get('kvloom_kv_cache_blocks_used')} | {r['elapsed_s']:.0f} s |")
    return "\n".join(rows)


def soak_table(s: dict) -> str:
    q, lat, mem, th = s["requests"], s["requests"]["latency"], s["memory"], s["threads"]
    o = q["by_outcome"]
    lines = [
        f"{q['total']:,} requests in {s['duration_s']:.0f} s of soak (after {s['settings']['warmup']:.0f} s of "
        f"warm-up), {s['server']['model']}, CPU class {s['machine']['cpu_class']}, bursts of {s['burst_size']}, "
        f"max_waiting_requests {s['server']['max_waiting_requests']}.",
        "",
        "| sent | finished | rejected (with a reason) | cancelled by the client | lost |",
        "|---|---|---|---|---|",
        f"| {q['total']:,} | {o['finished']:,} | {o['rejected']:,} | {o['cancelled']:,} | {o['lost']} |",
        "",
        "| rejected because | count |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(q["reasons"]["rejected"].items(), key=lambda kv: -kv[1])],
        "",
        "| check | value |", "|---|---|",
        f"| end-to-end latency of finished requests, p50 / p99 / max | {lat['e2e_s']['p50']:.2f} / "
        f"{lat['e2e_s']['p99']:.2f} / {lat['e2e_s']['max']:.2f} s |",
        f"| time to first token (streams), p50 / p99 | {lat['ttft_s']['p50']:.2f} / {lat['ttft_s']['p99']:.2f} s |",
        f"| server counters agree with the clients | {s['server_counters']['ok']} |",
        f"| idle afterwards: running, waiting, KV blocks in use | {s['idle']['kvloom_num_requests_running']:.0f}, "
        f"{s['idle']['kvloom_num_requests_waiting']:.0f}, {s['idle']['kvloom_kv_cache_blocks_used']:.0f} |",
        f"| resident memory after warm-up -> end (peak) | {mem['rss_start_mib']:.0f} -> {mem['rss_end_mib']:.0f} MiB "
        f"({mem['rss_peak_mib']:.0f}); growth {mem['growth_mib']:+.1f} MiB, bound {mem['bound_mib']:.0f} |",
        f"| threads start -> end (peak) | {th['start']} -> {th['end']} ({th['peak']}) |",
        f"| server exit code after SIGTERM, tracebacks in its log | {s['server']['exit_code']}, "
        f"{s['server']['tracebacks']} |",
        f"| all checks passed | {s['passed']} |",
    ]
    return "\n".join(lines)


def faults_table(f: dict) -> str:
    rows = ["| fault | requests | ended with an error (as) | finished, tokens as without the fault | "
            "afterwards | idle: running, waiting, KV blocks | exit code |", "|---|---|---|---|---|---|---|"]
    for kind, e in f["faults"].items():
        if "after" in e:
            after = (f"{e['after']['finished_with_reference_tokens']}/{e['after']['requests']} same tokens, "
                     f"/health {e['health_after']}")
            idle = ", ".join(f"{v:.0f}" for v in e["idle"].values())
        else:
            after = f"/health {e['health_after']}, new request {e['new_request_after']}"
            idle = "-"
        rows.append(f"| `{e['spec']}` | {e['requests']} | {e['failed']} ({', '.join(e['failed_as'])}) | "
                    f"{e['finished_with_reference_tokens']}/{e['finished']} | {after} | {idle} | {e['exit_code']} |")
    return "\n".join(rows)


def main() -> None:
    for name, render in (("fuzz.json", fuzz_table), ("soak.json", soak_table), ("faults.json", faults_table)):
        data = _load(name)
        print(f"<!-- {name} -->")
        print(render(data) if data is not None else f"({name} is missing)", end="\n\n")


if __name__ == "__main__":
    sys.exit(main())
