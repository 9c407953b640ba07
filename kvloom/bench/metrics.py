"""Serving metrics from per-request timestamps, defined as vLLM's benchmark_serving defines them.

TTFT: first token time - send time. TPOT: (e2e - ttft) / (output_tokens - 1).
ITL: gaps between successive streamed chunks. Goodput: requests per second
that met every SLO given.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds on the client's clock."""

    input_len: int
    output_len_asked: int
    start: float = 0.0
    first_token: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    success: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.first_token is None or self.end is None:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times)) if len(self.chunk_times) > 1 else []


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=500ms,tpot=100ms,e2e=10s' -> {'ttft': 0.5, 'tpot': 0.1, 'e2e': 10.0}."""
    if not text:
        return {}
    slos = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(ttft|tpot|e2e)\s*=\s*([0-9.]+)\s*(ms|s)?\s*", part)
        if not m:
            raise ValueError(f"cannot read SLO {part!r}; use e.g. ttft=500ms,tpot=100ms")
        value = float(m.group(2)) / (1000.0 if m.group(3) == "ms" else 1.0)
        slos[m.group(1)] = value
    return slos


def _dist(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean / median / p90 / p99, in milliseconds by default."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float) * scale
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def meets_slo(r: RequestRecord, slos: dict[str, float]) -> bool:
    for name, limit in slos.items():
        value = getattr(r, name)
        if name == "tpot" and value is None and r.success:
            continue  # a one-token answer has no TPOT to miss
        if value is None or value > limit:
            return False
    return True


def summarize(records: list[RequestRecord], duration: float, slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    itls = [x for r in ok for x in r.itls]
    summary = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (out_tokens + in_tokens) / duration if duration > 0 else 0.0,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ttft_ms": _dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _dist([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _dist(itls),
        "e2e_ms": _dist([r.e2e for r in ok if r.e2e is not None]),
    }
    if slos:
        good = [r for r in ok if meets_slo(r, slos)]
        summary["slo"] = {k: v * 1000.0 for k, v in slos.items()}
        summary["goodput"] = len(good) / duration if duration > 0 else 0.0
        summary["slo_attainment"] = len(good) / len(records) if records else 0.0
    errors = [r.error for r in records if r.error]
    if errors:
        summary["errors"] = sorted(set(errors))[:10]
    return summary
