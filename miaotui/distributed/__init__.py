"""Distributed inference on torch.distributed: tensor, pipeline and data parallelism."""
