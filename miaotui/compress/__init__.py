"""Compression: model -> smaller model (quantization now; pruning and distillation later)."""
