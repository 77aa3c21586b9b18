"""Measurement: perplexity and speed benchmarks."""
