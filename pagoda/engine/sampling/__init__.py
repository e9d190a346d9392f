"""Sampling parameters (validated once) and the batched sampler."""
