"""Cheap features of a query, computed in microseconds from its text: what a router can afford per request."""
from __future__ import annotations

import math
import re

import numpy as np

_CODE = re.compile(r"```|\bdef |\bclass |\bimport |\breturn\b|[{};]\s*$|=>|\(\)|#include", re.MULTILINE)
_DIGITS = re.compile(r"\d")
_ARITHMETIC = re.compile(r"\d\s*[-+*/×x^]\s*\d")
FEATURE_NAMES = ("bias", "log_length", "code", "arithmetic", "digits", "non_ascii", "question")


def query_features(text: str) -> np.ndarray:
    """[bias, log(1 + words)/8, looks like code, holds arithmetic (3 + 4), share of digits, share of non-ASCII letters (another
    language or script), ends with a question mark]: all in about [0, 1], so one bandit scale fits them."""
    n = max(1, len(text))
    words = len(text.split())
    return np.array([
        1.0,
        min(1.0, math.log1p(words) / 8.0),
        1.0 if _CODE.search(text) else 0.0,
        1.0 if _ARITHMETIC.search(text) else 0.0,
        len(_DIGITS.findall(text)) / n,
        sum(1 for c in text if ord(c) > 127) / n,
        1.0 if text.rstrip().endswith("?") else 0.0,
    ])


def request_text(body: dict) -> str:
    """The text a router looks at: a chat's last user message, or a completion's prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                content = m.get("content")
                if isinstance(content, list):
                    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                return content if isinstance(content, str) else ""
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return ""
