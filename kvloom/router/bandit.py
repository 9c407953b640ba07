"""A contextual bandit (LinUCB, Li et al. 2010) choosing a model per query from its features.

Reward = quality - lambda * cost: quality comes from feedback (a client's score, or an offline evaluation's
checked answer), cost is the chosen model's relative price. Each arm keeps a ridge regression of reward on the
features; the arm with the highest upper confidence bound wins, ties broken by a seeded generator, so a run is
reproducible.
"""
from __future__ import annotations

import threading

import numpy as np


class LinUCB:
    def __init__(self, arms: list[str], dim: int, alpha: float = 0.5, ridge: float = 1.0, seed: int = 0):
        if not arms:
            raise ValueError("a bandit needs at least one arm")
        self.arms = list(arms)
        self.alpha = alpha
        self.a = {arm: np.eye(dim) * ridge for arm in arms}     # X^T X + ridge I per arm
        self.b = {arm: np.zeros(dim) for arm in arms}           # X^T reward per arm
        self.pulls = {arm: 0 for arm in arms}
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()                             # feedback and choices come from several threads

    def scores(self, x: np.ndarray) -> dict[str, float]:
        """Upper confidence bound of each arm's reward at x."""
        out = {}
        with self.lock:
            for arm in self.arms:
                a_inv = np.linalg.inv(self.a[arm])
                theta = a_inv @ self.b[arm]
                out[arm] = float(theta @ x + self.alpha * np.sqrt(x @ a_inv @ x))
        return out

    def choose(self, x: np.ndarray) -> tuple[str, dict[str, float]]:
        scores = self.scores(x)
        best = max(scores.values())
        tied = [arm for arm, s in scores.items() if s >= best - 1e-12]
        with self.lock:
            arm = tied[int(self.rng.integers(len(tied)))] if len(tied) > 1 else tied[0]
        return arm, scores

    def update(self, arm: str, x: np.ndarray, reward: float) -> None:
        with self.lock:
            self.a[arm] += np.outer(x, x)
            self.b[arm] += reward * x
            self.pulls[arm] += 1

    def fit_offline(self, rows) -> int:
        """Warm start from an offline evaluation run: (arm, features, reward) rows, e.g. every model's checked
        answer on a task set (GreenServ-style); returns how many rows were used."""
        n = 0
        for arm, x, reward in rows:
            if arm in self.a:
                self.update(arm, np.asarray(x, dtype=float), float(reward))
                n += 1
        return n
