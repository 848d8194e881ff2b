"""Compile time: the targets table, the pass pipeline, the nn-level KV cache and the build driver."""
