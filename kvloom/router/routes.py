"""Named routes: `--route NAME=POLICY[,key=value...]`; a request whose `model` is a route's name (or "auto", the
first route) is given a model by it.

  bandit[,arms=a+b][,costs=0+1][,lambda=0.2][,alpha=0.5][,seed=0][,warm=rows.json]
  cascade[,small=a][,big=b][,threshold=-0.5][,measure=mean_logprob|min_logprob|neg_entropy]

A bandit's arms default to every served model, in the order given, costing 0 for the first up to 1 for the last;
a cascade's small model is the first served model, its big one the last.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from kvloom.errors import KvloomError
from kvloom.router.bandit import LinUCB
from kvloom.router.cascade import CONFIDENCE_MEASURES, confidence
from kvloom.router.features import FEATURE_NAMES, query_features

AUTO = "auto"


@dataclass(frozen=True)
class RouteSpec:
    name: str
    policy: str
    options: dict = field(default_factory=dict)


def parse_route(text: str) -> RouteSpec:
    name, sep, rest = text.partition("=")
    policy, *pairs = rest.split(",")
    if not sep or not name or policy not in ("bandit", "cascade"):
        raise KvloomError(f"--route takes NAME=bandit[,key=value...] or NAME=cascade[,key=value...], got {text!r}")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KvloomError(f"--route {name}: options are key=value, got {pair!r}")
        options[key] = value
    return RouteSpec(name, policy, options)


def _float(spec: RouteSpec, key: str, default: float) -> float:
    try:
        return float(spec.options.get(key, default))
    except ValueError:
        raise KvloomError(f"--route {spec.name}: {key} must be a number, got {spec.options[key]!r}") from None


def _known(spec: RouteSpec, names: list[str], models: list[str]) -> list[str]:
    for n in names:
        if n not in models:
            raise KvloomError(f"--route {spec.name} names model {n!r}, which is not served "
                              f"(served: {', '.join(models)})")
    return names


class BanditRoute:
    policy = "bandit"

    def __init__(self, spec: RouteSpec, models: list[str]):
        allowed = {"arms", "costs", "lambda", "alpha", "seed", "warm"}
        if unknown := set(spec.options) - allowed:
            raise KvloomError(f"--route {spec.name}: unknown bandit option(s) {', '.join(sorted(unknown))}")
        self.name = spec.name
        self.arms = _known(spec, spec.options["arms"].split("+") if "arms" in spec.options else list(models), models)
        if len(self.arms) < 2:
            raise KvloomError(f"--route {spec.name}: a bandit needs two arms or more")
        if "costs" in spec.options:
            costs = [float(c) for c in spec.options["costs"].split("+")]
            if len(costs) != len(self.arms):
                raise KvloomError(f"--route {spec.name}: one cost per arm")
        else:
            costs = [i / (len(self.arms) - 1) for i in range(len(self.arms))]
        self.costs = dict(zip(self.arms, costs))
        self.lam = _float(spec, "lambda", 0.2)
        self.bandit = LinUCB(self.arms, len(FEATURE_NAMES), alpha=_float(spec, "alpha", 0.5),
                             seed=int(_float(spec, "seed", 0)))
        if "warm" in spec.options:
            with open(spec.options["warm"]) as f:
                rows = json.load(f)
            self.bandit.fit_offline((r["arm"], r["features"], self.reward(r["arm"], r["quality"])) for r in rows)

    def reward(self, arm: str, quality: float) -> float:
        return quality - self.lam * self.costs[arm]

    def decide(self, text: str) -> tuple[str, np.ndarray, str]:
        x = query_features(text)
        arm, scores = self.bandit.choose(x)
        reason = "highest upper confidence bound of quality - %g*cost: %s" % (
            self.lam, ", ".join(f"{a}={s:.3f}" for a, s in scores.items()))
        return arm, x, reason

    def feedback(self, arm: str, x: np.ndarray, score: float) -> float:
        reward = self.reward(arm, score)
        self.bandit.update(arm, x, reward)
        return reward


class CascadeRoute:
    policy = "cascade"

    def __init__(self, spec: RouteSpec, models: list[str]):
        allowed = {"small", "big", "threshold", "measure"}
        if unknown := set(spec.options) - allowed:
            raise KvloomError(f"--route {spec.name}: unknown cascade option(s) {', '.join(sorted(unknown))}")
        self.name = spec.name
        self.small, self.big = _known(spec, [spec.options.get("small", models[0]),
                                             spec.options.get("big", models[-1])], models)
        if self.small == self.big:
            raise KvloomError(f"--route {spec.name}: a cascade needs two different models")
        self.threshold = _float(spec, "threshold", -0.5)
        self.measure = spec.options.get("measure", "mean_logprob")
        if self.measure not in CONFIDENCE_MEASURES:
            raise KvloomError(f"--route {spec.name}: measure must be one of {', '.join(CONFIDENCE_MEASURES)}")

    def judge(self, token_logprobs: list[float], top_logprobs: list[list[float]] | None = None) -> tuple[bool, str]:
        """(escalate?, why)."""
        c = confidence(token_logprobs, self.measure, top_logprobs)
        shown = f"{c:.3f}" if math.isfinite(c) else str(c)
        if c < self.threshold:
            return True, f"{self.small}'s {self.measure} {shown} < threshold {self.threshold:g}: escalated"
        return False, f"{self.small}'s {self.measure} {shown} >= threshold {self.threshold:g}"


def build_routes(specs: list[RouteSpec], models: list[str]) -> dict:
    routes = {}
    for spec in specs:
        if spec.name in models or spec.name in routes:
            raise KvloomError(f"--route {spec.name}: the name is already a model's or another route's")
        routes[spec.name] = (BanditRoute if spec.policy == "bandit" else CascadeRoute)(spec, models)
    return routes
