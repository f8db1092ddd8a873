"""An independent float64 implementation of OLMo2 (+ RAT+ memory) from HF-named weights.

Written from the equations, one time step at a time for the memory, so tests can check the
megatron and HF models against something that shares none of their code.
"""
from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, theta):  # x [b, heads, s, hn], rotate-half convention
    s, hn = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hn, 2, dtype=torch.float64) / hn)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : hn // 2], x[..., hn // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _decay(g, x):  # [b, s, c]: x~_t = g_t x~_{t-1} + (1 - g_t) x_t, state 0
    out, h = torch.empty_like(x), torch.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        h = g[:, t] * h + (1 - g[:, t]) * x[:, t]
        out[:, t] = h
    return out


def olmo2_forward(w: dict, cfg, ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] in float64. ``w`` holds float64 tensors with HF OLMo2 names."""
    b, s = ids.shape
    np_, ng, hn, eps = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    x = w["model.embed_tokens.weight"][ids]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        q = _rms(x @ w[p + "self_attn.q_proj.weight"].T, w[p + "self_attn.q_norm.weight"], eps)
        k = _rms(x @ w[p + "self_attn.k_proj.weight"].T, w[p + "self_attn.k_norm.weight"], eps)
        v = x @ w[p + "self_attn.v_proj.weight"].T
        if cfg.memory.enabled:
            logit = x @ w[p + "self_attn.g_proj.weight"].T
            if p + "self_attn.g_proj.bias" in w:
                logit = logit + w[p + "self_attn.g_proj.bias"]
            g = torch.sigmoid(logit)
            k, v = _decay(g, k), _decay(g, v)
        q = _rope(q.view(b, s, np_, hn).transpose(1, 2), cfg.rope_theta)
        k = _rope(k.view(b, s, ng, hn).transpose(1, 2), cfg.rope_theta)
        v = v.view(b, s, ng, hn).transpose(1, 2)
        k, v = (t.repeat_interleave(np_ // ng, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hn)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        att = att.transpose(1, 2).reshape(b, s, np_ * hn)
        if cfg.memory.enabled and cfg.memory.output_gate:
            att = att * torch.sigmoid(x @ w[p + "self_attn.og_proj.weight"].T)
        x = x + _rms(att @ w[p + "self_attn.o_proj.weight"].T, w[p + "post_attention_layernorm.weight"], eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        mlp = (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        x = x + _rms(mlp, w[p + "post_feedforward_layernorm.weight"], eps)
    return _rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def random_hf_weights(cfg, seed: int = 0, gate_bias: float | None = None) -> dict:
    """Random HF-named fp32 weights for ``cfg`` (norm weights near 1, projections N(0, 0.1))."""
    gen = torch.Generator().manual_seed(seed)
    h, q, kv, f, v = (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim,
                      cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size)

    def rnd(*shape, std=0.1):
        return torch.randn(*shape, generator=gen) * std

    def norm(n):
        return 1.0 + rnd(n)

    w = {"model.embed_tokens.weight": rnd(v, h, std=1.0), "model.norm.weight": norm(h),
         "lm_head.weight": rnd(v, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                  p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                  p + "self_attn.q_norm.weight": norm(q), p + "self_attn.k_norm.weight": norm(kv),
                  p + "post_attention_layernorm.weight": norm(h),
                  p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                  p + "mlp.down_proj.weight": rnd(h, f), p + "post_feedforward_layernorm.weight": norm(h)})
        if cfg.memory.enabled:
            w[p + "self_attn.g_proj.weight"] = rnd(kv, h)
            if cfg.memory.has_gate_bias:
                w[p + "self_attn.g_proj.bias"] = rnd(kv) if gate_bias is None else torch.full((kv,), gate_bias)
            if cfg.memory.output_gate:
                w[p + "self_attn.og_proj.weight"] = rnd(q, h)
    return w
