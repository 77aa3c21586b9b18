"""Pruning: importance criteria, masks, SparseGPT, structured pruning and gradual schedules."""
