"""Inference engine for the NIAH evaluation: batched greedy decoding over HF causal LMs with
dense, dilated (RAT+), Quest, MoBA, SnapKV and random-block sparse attention, on the model's
plain K/V or, for memory models, the memory's K~/V~ (see ``spec`` and ``engine``)."""

from .engine import Engine, default_source, is_memory_model, sparse_attention
from .spec import (FULL, METHODS, SOURCES, Budget, KVSource, MethodSpec, SpecError, parse_budget, parse_budgets,
                   parse_kv_source)

__all__ = ["Engine", "default_source", "is_memory_model", "sparse_attention", "FULL", "METHODS", "SOURCES",
           "Budget", "KVSource", "MethodSpec", "SpecError", "parse_budget", "parse_budgets", "parse_kv_source"]
