"""Injected faults, for reliability tests only: off unless KVLOOM_INJECT_FAULTS (or Engine.faults) names some.

The spec is a comma-separated list of KIND@STEP (fires in the engine's STEP-th non-empty step, counted from 1)
or KIND=REQUEST_ID (fires in the first step that runs that request; its samples REQUEST_ID#k count too).
Each fires once. Kinds:
  runner, sampler, detokenizer   raise InjectedFault inside that stage of the step
  nan                            the request's logits row becomes NaN (with @STEP: the step's first sampled row)
  loop                           the engine's loop thread dies (server/async_engine.py)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

KINDS = ("runner", "sampler", "detokenizer", "nan", "loop")
ENV = "KVLOOM_INJECT_FAULTS"


class InjectedFault(RuntimeError):
    """Raised where a test asked for a fault; anything that survives it survives a real bug there."""


@dataclass
class _Fault:
    kind: str
    step: int | None
    request_id: str | None
    fired: bool = False

    def matches(self, step: int, request_ids) -> bool:
        if self.fired:
            return False
        if self.step is not None:
            return step == self.step
        return any(_is_sample_of(r, self.request_id) for r in request_ids)


class FaultPlan:
    def __init__(self, spec: str = ""):
        self.faults: list[_Fault] = [_parse(part.strip()) for part in spec.split(",") if part.strip()]
        self.step = 0
        self._now: dict[str, _Fault] = {}   # the faults armed for the current step, by kind

    @classmethod
    def from_env(cls) -> FaultPlan | None:
        spec = os.environ.get(ENV, "")
        return cls(spec) if spec.strip() else None

    def begin_step(self, request_ids: list[str]) -> None:
        """Arm the faults due in this step (called once a step, with the ids it runs)."""
        self.step += 1
        self._now = {}
        for f in self.faults:
            if f.kind not in self._now and f.matches(self.step, request_ids):
                self._now[f.kind] = f

    def fire(self, kind: str) -> None:
        """Raise if a `kind` fault is armed now."""
        f = self._now.pop(kind, None)
        if f is not None:
            f.fired = True
            raise InjectedFault(f"injected {kind} fault ({ENV})")

    def poisoned_row(self, request_ids: list[str]) -> int | None:
        """The index, among this step's sampled request ids, whose logits an armed nan fault poisons."""
        f = self._now.get("nan")
        if f is None or not request_ids:
            return None
        for i, rid in enumerate(request_ids):
            if f.request_id is None or _is_sample_of(rid, f.request_id):
                f.fired = True
                del self._now["nan"]
                return i
        return None


def _is_sample_of(sample_id: str, request_id: str) -> bool:
    return sample_id == request_id or sample_id.startswith(request_id + "#")   # engine.py names samples id#k


def _parse(part: str) -> _Fault:
    for sep in ("@", "="):
        if sep in part:
            kind, _, target = part.partition(sep)
            if kind not in KINDS or not target:
                break
            if sep == "@":
                if not target.isdigit() or int(target) < 1:
                    break
                return _Fault(kind, int(target), None)
            return _Fault(kind, None, target)
    raise ValueError(f"{ENV}: cannot read {part!r}; give KIND@STEP or KIND=REQUEST_ID with KIND one of {KINDS}")
