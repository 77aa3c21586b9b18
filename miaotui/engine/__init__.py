"""Generation: sampling parameters, the sampler, incremental detokenization and the batched loop."""
