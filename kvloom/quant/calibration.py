"""The w8a8 calibration pass: one window of corpus text through the engine's own runner.

Taken from far into the corpus, away from the text `kvloom eval perplexity` scores,
so calibration never sees the evaluation text.
"""
from __future__ import annotations

from kvloom.corpus import corpus_token_ids
from kvloom.engine.window_logits import window_logits

CALIBRATION_OFFSET = 20_000   # corpus tokens skipped before the window
MAX_WINDOW = 512


def calibration_pass(engine) -> None:
    n = min(MAX_WINDOW, engine.max_model_len)
    window_logits(engine, corpus_token_ids(engine.tokenizer, CALIBRATION_OFFSET + n)[-n:])
