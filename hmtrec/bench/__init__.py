"""Benchmark harness: suites, timing, reports written to docs/benchmarks.md."""
