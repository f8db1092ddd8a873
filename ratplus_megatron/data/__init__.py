"""Data pipeline: corpus tokenization into megatron-core indexed datasets, offline corpora."""
