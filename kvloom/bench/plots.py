"""Pictures of benchmark results (matplotlib, written as PNG)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def latency_throughput_curve(curves: dict[str, list[dict]], path: str, title: str = "") -> None:
    """curves: server label -> summaries of runs at increasing rates. p50/p99 TTFT and TPOT vs output tok/s."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (label, runs), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        runs = sorted(runs, key=lambda r: r["output_throughput"])
        x = [r["output_throughput"] for r in runs]
        for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
            ax.plot(x, [r[metric]["median"] for r in runs], "o-", color=color, label=f"{label} p50")
            ax.plot(x, [r[metric]["p99"] for r in runs], "s--", color=color, alpha=0.7, label=f"{label} p99")
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xlabel("achieved output throughput (tokens/s)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "latency vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def request_timeline(records, path: str, title: str = "") -> None:
    """One line per request: queued/prefill (send -> first token) and decode (first token -> end)."""
    recs = sorted((r for r in records if r.success), key=lambda r: r.start)
    if not recs:
        return
    t0 = recs[0].start
    fig, ax = plt.subplots(figsize=(10, max(3, len(recs) * 0.06)))
    for i, r in enumerate(recs):
        ax.plot([r.start - t0, r.first_token - t0], [i, i], color="tab:orange", lw=1.5)
        ax.plot([r.first_token - t0, r.end - t0], [i, i], color="tab:blue", lw=1.5)
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("request")
    ax.plot([], [], color="tab:orange", label="waiting + prefill (TTFT)")
    ax.plot([], [], color="tab:blue", label="decode")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "request timeline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
