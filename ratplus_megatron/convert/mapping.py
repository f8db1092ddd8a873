"""Weight and config mapping between HF OLMo2 (optionally with memory) and megatron-core.

Megatron names here are the full (TP=1, PP=1) model's; dist_checkpointing reshards them to any
TP/PP on load. HF's separate q/k/v (and the memory's og_proj, g_proj) projections are rows of
megatron's one fused `linear_qkv`, per query group [q, (og), k, v, (g)] (ratplus_megatron.qkv_layout);
HF's g_proj.bias is megatron's `self_attention.memory_gate_bias`. The functions pull one tensor at a
time from any Mapping (a dict, or a lazy safetensors view), so a conversion can stream.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..config import ConfigError, MemoryConfig, ModelConfig
from ..qkv_layout import GATE, qkv_parts_for, split_groups

OLMO2_ARCHITECTURES = {"Olmo2ForCausalLM", "Olmo2MemoryForCausalLM"}


def config_from_hf(hf: Mapping) -> ModelConfig:
    """ModelConfig from an HF OLMo2 config.json dict (every number read, none assumed)."""
    archs = set(hf.get("architectures") or [])
    if not archs & OLMO2_ARCHITECTURES and hf.get("model_type") not in ("olmo2", "olmo2_memory"):
        raise ConfigError(f"unsupported architecture {sorted(archs) or hf.get('model_type')!r}: "
                          f"expected one of {sorted(OLMO2_ARCHITECTURES)}")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                           "vocab_size", "max_position_embeddings", "rms_norm_eps") if hf.get(k) is None]
    if missing:
        raise ConfigError(f"config.json lacks {', '.join(missing)}")
    heads = hf["num_attention_heads"]
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias=true is not an OLMo2 layout this converter supports")
    if hf.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings=true is not supported (OLMo2 unties them)")
    memory = MemoryConfig(enabled=bool(hf.get("memory", False)),
                          gate_bias=bool(hf.get("memory_gate_bias", False)),
                          output_gate=bool(hf.get("memory_output_gate", False)))
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json lacks rope_theta (neither top level nor in rope_parameters)")
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ConfigError(f"RoPE scaling {rope.get('rope_type') or hf.get('rope_scaling')!r} is not supported "
                          "(only default RoPE)")
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"], rope_theta=float(theta),
        rms_norm_eps=hf["rms_norm_eps"], init_std=hf.get("initializer_range", 0.02), memory=memory)


def config_to_hf(cfg: ModelConfig, token_ids: Mapping | None = None) -> dict:
    """Keyword arguments of transformers' ``Olmo2Config`` (memory off) or ``Olmo2MemoryConfig``
    (memory on) for ``cfg``; ``token_ids`` may carry bos/eos/pad_token_id (None values are kept)."""
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.init_std,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if token_ids is not None and k in token_ids:
            kw[k] = token_ids[k]
    if cfg.memory.enabled:
        kw.update(memory=True, memory_gate_bias=cfg.memory.has_gate_bias,
                  memory_output_gate=cfg.memory.output_gate)
    return kw


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``cfg`` holds, with its shape (the order of hf_to_mcore's reads)."""
    h, q, kv, f, v = (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim,
                      cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size)
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, h)})
        if cfg.memory.enabled and cfg.memory.output_gate:
            out[p + "self_attn.og_proj.weight"] = (q, h)
        out.update({p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h)})
        if cfg.memory.enabled:
            out[p + "self_attn.g_proj.weight"] = (kv, h)
        out.update({p + "self_attn.q_norm.weight": (q,), p + "self_attn.k_norm.weight": (kv,)})
        if cfg.memory.enabled and cfg.memory.has_gate_bias:
            out[p + "self_attn.g_proj.bias"] = (kv,)
        out.update({p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f), p + "post_feedforward_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return out


def _layer_names(i: int) -> tuple[str, str]:
    return f"model.layers.{i}.", f"decoder.layers.{i}."


def hf_to_mcore(hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for the full model, reading ``hf`` lazily."""
    ng = cfg.num_kv_heads
    parts = qkv_parts_for(cfg)
    hf_proj = {"q": "q_proj", "og": "og_proj", "k": "k_proj", "v": "v_proj", GATE: "g_proj"}
    yield "embedding.word_embeddings.weight", hf["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        h, m = _layer_names(i)
        # megatron's fused qkv: per query group [q heads, (output gate), k, v, (memory gate)]
        rows = [hf[h + f"self_attn.{hf_proj[name]}.weight"].view(ng, size, -1) for name, size in parts]
        yield m + "self_attention.linear_qkv.weight", torch.cat(rows, dim=1).reshape(-1, rows[0].shape[-1])
        yield m + "self_attention.q_layernorm.weight", hf[h + "self_attn.q_norm.weight"]
        yield m + "self_attention.k_layernorm.weight", hf[h + "self_attn.k_norm.weight"]
        if cfg.memory.enabled and cfg.memory.has_gate_bias:
            yield m + "self_attention.memory_gate_bias", hf[h + "self_attn.g_proj.bias"]
        yield m + "self_attention.linear_proj.weight", hf[h + "self_attn.o_proj.weight"]
        yield m + "self_attention.linear_proj.post_norm.weight", hf[h + "post_attention_layernorm.weight"]
        yield m + "mlp.linear_fc1.weight", torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
        yield m + "mlp.linear_fc2.weight", hf[h + "mlp.down_proj.weight"]
        yield m + "mlp.linear_fc2.post_norm.weight", hf[h + "post_feedforward_layernorm.weight"]
    yield "decoder.final_layernorm.weight", hf["model.norm.weight"]
    yield "output_layer.weight", hf["lm_head.weight"]


def mcore_to_hf(mc: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from the full megatron model's tensors: the inverse of hf_to_mcore."""
    parts = qkv_parts_for(cfg)
    yield "model.embed_tokens.weight", mc["embedding.word_embeddings.weight"]
    for i in range(cfg.num_layers):
        h, m = _layer_names(i)
        qkv = mc[m + "self_attention.linear_qkv.weight"]
        views = split_groups(qkv, parts)  # [groups, rows, hidden] each; copied one at a time below

        def rows(name):
            return views[name].reshape(-1, qkv.shape[-1])

        yield h + "self_attn.q_proj.weight", rows("q")
        if "og" in views:
            yield h + "self_attn.og_proj.weight", rows("og")
        yield h + "self_attn.k_proj.weight", rows("k")
        yield h + "self_attn.v_proj.weight", rows("v")
        yield h + "self_attn.o_proj.weight", mc[m + "self_attention.linear_proj.weight"]
        yield h + "self_attn.q_norm.weight", mc[m + "self_attention.q_layernorm.weight"]
        yield h + "self_attn.k_norm.weight", mc[m + "self_attention.k_layernorm.weight"]
        if GATE in views:
            yield h + "self_attn.g_proj.weight", rows(GATE)
            if cfg.memory.has_gate_bias:
                yield h + "self_attn.g_proj.bias", mc[m + "self_attention.memory_gate_bias"]
        yield h + "post_attention_layernorm.weight", mc[m + "self_attention.linear_proj.post_norm.weight"]
        gate, up = mc[m + "mlp.linear_fc1.weight"].chunk(2)
        yield h + "mlp.gate_proj.weight", gate
        yield h + "mlp.up_proj.weight", up
        yield h + "mlp.down_proj.weight", mc[m + "mlp.linear_fc2.weight"]
        yield h + "post_feedforward_layernorm.weight", mc[m + "mlp.linear_fc2.post_norm.weight"]
    yield "model.norm.weight", mc["decoder.final_layernorm.weight"]
    yield "lm_head.weight", mc["output_layer.weight"]
