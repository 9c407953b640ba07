"""Inference-time scaling: many samples serve one query (best-of-N, self-consistency votes, adaptive sampling,
beam search, guided search). `spec` reads and checks the request's settings, `answers` extracts and counts
answers, `strategy` decides how many samples to draw and which to return, `offline` and the server's serving.py
drive it. Beam and guided search are programs that act between engine steps (`search`: offline `run_searches`,
the server's engine thread through AsyncEngine.run_search; `search_spec` reads the server's fields).
"""
from kvloom.scaling.spec import ScalingSpec
from kvloom.scaling.strategy import Sample, Strategy

__all__ = ["ScalingSpec", "Sample", "Strategy"]
