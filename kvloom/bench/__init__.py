"""Benchmarks: offline latency and throughput (more in later issues)."""
