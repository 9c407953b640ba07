"""Inference-time scaling: many samples serve one query (best-of-N, self-consistency votes, adaptive sampling,
guided search). `spec` reads and checks the request's settings, `answers` extracts and counts answers,
`strategy` decides how many samples to draw and which to return, `offline` and the server's serving.py drive it.
"""
from kvloom.scaling.spec import ScalingSpec
from kvloom.scaling.strategy import Sample, Strategy

__all__ = ["ScalingSpec", "Sample", "Strategy"]
