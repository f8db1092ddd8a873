"""The OLMo2 (+ RAT+ memory) megatron-core model against outside references, on CPU."""
from __future__ import annotations

import pytest
import torch

from ratplus_megatron.config import ConfigError, MemoryConfig, PrecisionConfig, preset
from ratplus_megatron.convert.mapping import hf_to_mcore
from ratplus_megatron.qkv_layout import copy_common_parts, qkv_parts_for, split_groups
from reference_olmo2 import olmo2_forward, random_hf_weights

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=4, head_dim=16,
            ffn_hidden_size=96, vocab_size=128, max_position_embeddings=64, rope_theta=10000.0)


def _megatron_model(cfg, hf_weights):
    from ratplus_megatron.model import build_model, to_transformer_config

    model = build_model(cfg, to_transformer_config(cfg), use_te=False)
    missing, unexpected = model.load_state_dict(dict(hf_to_mcore(hf_weights, cfg)), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return model


def _logits(model, ids):
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model(ids, pos, None)  # [b, s, vocab]


def _ids(cfg, b=2, s=24, seed=0):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def test_memory_off_matches_transformers_olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = preset("tiny", **TINY)
    w = random_hf_weights(cfg, seed=1)
    hf_cfg = Olmo2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_kv_heads,
                         max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                         rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False)
    hf = Olmo2ForCausalLM(hf_cfg).eval()
    hf.load_state_dict(w, strict=True)
    ids = _ids(cfg)
    with torch.no_grad():
        ours = _logits(_megatron_model(cfg, w).eval(), ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", [
    MemoryConfig(enabled=True),
    MemoryConfig(enabled=True, gate_bias=True),
    MemoryConfig(enabled=True, output_gate=True),
], ids=["gate", "gate+bias", "output-gate"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_memory_matches_float64_equations(memory, kernels, monkeypatch):
    """The model's math and gradients against float64 equations, through the torch scan and through
    the Triton kernel (interpreted on CPU; what CUDA runs), which takes the gate logits and v as
    strided views of the fused linear_qkv output."""
    monkeypatch.setenv("RATPLUS_KERNELS", kernels)
    cfg = preset("tiny", **TINY, memory=memory)
    w = random_hf_weights(cfg, seed=2)
    ids = _ids(cfg, s=19)  # odd length
    model = _megatron_model(cfg, w)
    logits = _logits(model, ids)
    proj = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (logits.double() * proj).sum().backward()

    w64 = {k: v.double().requires_grad_() for k, v in w.items()}
    ref = olmo2_forward(w64, cfg, ids)
    (ref * proj).sum().backward()
    torch.testing.assert_close(logits.double(), ref.detach(), atol=2e-5, rtol=1e-4)
    ref_grads = dict(hf_to_mcore({k: v.grad for k, v in w64.items()}, cfg))
    for name, p in model.named_parameters():
        g, r = p.grad.double(), ref_grads[name]
        err = (g - r).norm() / r.norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("memory", [
    MemoryConfig(enabled=True),
    MemoryConfig(enabled=True, gate_bias=True),
    MemoryConfig(enabled=True, output_gate=True),
    MemoryConfig(enabled=True, gate_bias=True, output_gate=True),
], ids=["gate", "gate+bias", "output-gate", "output-gate+gate-bias"])
def test_fused_gate_rows_compute_the_hf_gate_logits(memory, monkeypatch):
    """The gate rows fused into linear_qkv ([q, (og), k, v, g] per query group) give exactly HF's
    g_proj: the scan receives h @ W_g^T (+ b) as a view of the fused GEMM's output (no copy without
    a bias), and v as h @ W_v^T; HF -> megatron -> HF gives back every tensor bit for bit."""
    import ratplus_megatron.model.attention as attention
    from ratplus_megatron.convert.mapping import mcore_to_hf

    cfg = preset("tiny", **{**TINY, "num_kv_heads": 2}, memory=memory)  # 2 q heads per group
    w = random_hf_weights(cfg, seed=7)
    back = dict(mcore_to_hf(dict(hf_to_mcore(w, cfg)), cfg))
    assert sorted(back) == sorted(w) and all(torch.equal(back[k], w[k]) for k in w)

    model = _megatron_model(cfg, w)
    attn = model.decoder.layers[0].self_attention
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.update(h=args[0].detach()))  # hooks return None
    attn.linear_qkv.register_forward_hook(lambda m, args, out: seen.update(qkv=out[0]))
    scan = attention.memory_scan

    def spy(g_logits, k, v, **kwargs):
        seen.setdefault("scan", (g_logits, v))  # layer 0's, the first call
        return scan(g_logits, k, v, **kwargs)

    monkeypatch.setattr(attention, "memory_scan", spy)
    with torch.no_grad():
        _logits(model, _ids(cfg, s=11))
    h, (g_logits, v) = seen["h"], seen["scan"]  # h [s, b, hidden]; scan inputs [b, s, kv heads, hn]
    p = "model.layers.0.self_attn."
    want = h @ w[p + "g_proj.weight"].T
    if memory.has_gate_bias:
        want = want + w[p + "g_proj.bias"]
    torch.testing.assert_close(g_logits.transpose(0, 1).reshape(want.shape), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v.transpose(0, 1).reshape(want.shape), h @ w[p + "v_proj.weight"].T,
                               atol=1e-6, rtol=1e-5)
    fused = seen["qkv"].untyped_storage().data_ptr()
    assert v.untyped_storage().data_ptr() == fused
    assert (g_logits.untyped_storage().data_ptr() == fused) != memory.has_gate_bias


def test_identity_gate_init_starts_near_plain_olmo2():
    """W_g = 0, bias -6 (g = 0.0025): the memory model reproduces the attention model closely."""
    plain = preset("tiny", **TINY)
    mem = preset("tiny", **TINY, memory=MemoryConfig(enabled=True, gate_init="identity"))
    w = random_hf_weights(plain, seed=4)
    ids = _ids(plain)
    from ratplus_megatron.model import build_model, to_transformer_config

    model = build_model(mem, to_transformer_config(mem), use_te=False).eval()
    state = dict(hf_to_mcore(w, plain))
    for i, layer in enumerate(model.decoder.layers):  # plain q/k/v rows into the fused [q, k, v, g]
        attn = layer.self_attention
        src = state.pop(f"decoder.layers.{i}.self_attention.linear_qkv.weight")
        assert copy_common_parts(attn.linear_qkv.weight, attn.qkv_parts, src, qkv_parts_for(plain)) == (["g"], [])
    missing, _ = model.load_state_dict(state, strict=False)
    assert sorted(k for k in missing if not k.endswith("_extra_state")) == [
        f"decoder.layers.{i}.self_attention.{p}" for i in range(plain.num_layers)
        for p in ("linear_qkv.weight", "memory_gate_bias")]
    attn = model.decoder.layers[0].self_attention
    assert split_groups(attn.linear_qkv.weight, attn.qkv_parts)["g"].abs().max() == 0
    assert torch.allclose(attn.memory_gate_bias, torch.tensor(-6.0))
    with torch.no_grad():
        ours = _logits(model, ids)
        base = _logits(_megatron_model(plain, w).eval(), ids)
    rel = ((ours - base).abs().max() / base.abs().max()).item()
    print(f"identity-init relative logit change {rel:.3e}")
    assert rel < 2e-2, f"identity init moved logits by {rel:.3e} of their range"
    assert (ours - base).abs().max() > 0  # the memory is really there


def test_fp8_without_transformer_engine_is_a_clear_error():
    from ratplus_megatron.model import HAVE_TE

    if HAVE_TE:
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(ConfigError, match="fp8='hybrid' needs Transformer Engine"):
        PrecisionConfig(fp8="hybrid").validate()


def test_fusions_follow_the_device_and_the_recipe():
    """megatron's fused SwiGLU/RoPE are on by default only with CUDA; a recipe can force either way."""
    from ratplus_megatron.model import HAVE_TE, to_transformer_config
    from ratplus_megatron.train.config import load_config

    cfg = preset("tiny")
    auto = to_transformer_config(cfg, PrecisionConfig(bf16=False))
    assert auto.bias_activation_fusion is torch.cuda.is_available()
    forced = to_transformer_config(cfg, PrecisionConfig(bf16=False, fusions=True))
    assert forced.bias_activation_fusion and forced.apply_rope_fusion is HAVE_TE
    assert load_config(None, ["precision.fusions=false"]).precision.fusions is False


@pytest.mark.parametrize("kwargs,tp,message", [
    (dict(num_attention_heads=6, num_kv_heads=6), 4, "does not divide num_attention_heads=6"),
    (dict(head_dim=15), 1, "head_dim must be even"),
    (dict(num_attention_heads=4, num_kv_heads=3), 1, "not a multiple of num_kv_heads=3"),
    (dict(vocab_size=129), 2, "does not divide vocab_size=129"),
], ids=["tp-heads", "odd-head-dim", "gqa-groups", "tp-vocab"])
def test_inconsistent_configs_raise(kwargs, tp, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny", **kwargs).validate(tp=tp)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown model preset 'olmo3'"):
        preset("olmo2-bogus".replace("2-bogus", "3"))
    with pytest.raises(ConfigError, match=r"unknown model field\(s\) \['hidden'\]"):
        preset("tiny", hidden=3)
    with pytest.raises(ConfigError, match="gate_init='identity' needs memory.gate_bias"):
        preset("tiny", memory=dict(enabled=True, gate_init="identity", gate_bias=False)).validate()


def test_presets_match_published_shapes():
    seven = preset("olmo2-7b")
    assert (seven.num_layers, seven.hidden_size, seven.num_attention_heads, seven.ffn_hidden_size,
            seven.vocab_size, seven.rope_theta) == (32, 4096, 32, 11008, 100352, 500000.0)
    assert 7.2e9 < seven.num_parameters() < 7.4e9
    mem = preset("olmo2-7b", memory=MemoryConfig(enabled=True))
    assert mem.num_parameters() - seven.num_parameters() == 32 * 4096 * 4096  # one d x d gate per layer
    one = preset("olmo2-1b")
    assert (one.num_layers, one.hidden_size, one.ffn_hidden_size) == (16, 2048, 8192)


@pytest.mark.parametrize("gate_bias", [False, True], ids=["memory", "memory+gate-bias"])
def test_weight_decay_skips_every_norm_gain(gate_bias):
    """megatron's optimizer decays all but 1-D parameters and biases: every norm gain, the QK norms
    included, must be 1-D (a 2-D QK gain was decayed towards 0, capping attention's sharpness), and
    the memory's gate bias (its own 1-D parameter, linear_qkv has no bias) must not be decayed either."""
    from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides

    from ratplus_megatron.model import build_model, to_transformer_config

    cfg = preset("tiny", **TINY, memory=MemoryConfig(enabled=True, gate_bias=gate_bias))
    model = build_model(cfg, to_transformer_config(cfg), use_te=False)
    no_decay_keys = [k for k, o in get_standard_config_overrides(OptimizerConfig(lr=1e-3)).items()
                     if o.get("wd_mult") == 0.0]
    skipped = {n for n, p in model.named_parameters() if any(k.matches(p, n) for k in no_decay_keys)}
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    biases = {n for n, _ in model.named_parameters() if n.endswith("memory_gate_bias")}
    assert {n for n in norms if "q_layernorm" in n or "k_layernorm" in n}, "no QK norm found"
    assert len(biases) == (cfg.num_layers if gate_bias else 0)
    assert skipped == norms | biases, (sorted(skipped ^ (norms | biases)))
    cpu_no_decay = {n for n, p in model.named_parameters() if p.ndim < 2}  # the CPU trainer's rule
    assert cpu_no_decay == norms | biases
