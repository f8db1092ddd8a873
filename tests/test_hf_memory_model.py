"""The transformers model of OLMo2 with the RAT+ decaying memory (ratplus_megatron.hf), on CPU.

Tiny random configs built in code; nothing is downloaded.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Olmo2Config, Olmo2ForCausalLM

from ratplus_megatron.hf import Olmo2MemoryCache, Olmo2MemoryConfig, Olmo2MemoryForCausalLM
from ratplus_megatron.hf import modeling_olmo2_memory as modeling
from tiny_models import init_unit_scale_

REPO = Path(__file__).resolve().parents[1]
VOCAB = 61
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0,
            bos_token_id=None, eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0})


def make_model(seed=0, attn="sdpa", **overrides):
    """A tiny memory model with O(1) activations and logits (the default init of std 0.02 makes every
    logit nearly 0, which would hide mistakes), gates spread over (0, 1)."""
    torch.manual_seed(seed)
    config = Olmo2MemoryConfig(**{**TINY, **overrides})
    model = Olmo2MemoryForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    init_unit_scale_(model)
    return model


def tokens(batch, seq, seed=1):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# An independent float64 reference of the equations
# ----------------------------------------------------------------------------------------------------

def reference_logits(model, ids):
    """OLMo2 + memory written out in float64, the recurrence as a loop over time. ids: [batch, seq]."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    eps = cfg.rms_norm_eps
    T = ids.shape[1]

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    inv_freq = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]

    def rope(x):  # [T, heads, D]
        return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = []
    for row in ids:
        h = sd["model.embed_tokens.weight"][row]
        for i in range(cfg.num_hidden_layers):
            def lin(name, x, p=f"model.layers.{i}."):
                y = x @ sd[p + name + ".weight"].T
                return y + sd[p + name + ".bias"] if p + name + ".bias" in sd else y

            def w(name, p=f"model.layers.{i}."):
                return sd[p + name + ".weight"]

            q = rms(lin("self_attn.q_proj", h), w("self_attn.q_norm")).view(T, H, D)
            k = rms(lin("self_attn.k_proj", h), w("self_attn.k_norm")).view(T, KV, D)
            v = lin("self_attn.v_proj", h).view(T, KV, D)
            if cfg.memory:
                g = torch.sigmoid(lin("self_attn.g_proj", h)).view(T, KV, D)
                ks, vs = torch.zeros(KV, D, dtype=torch.float64), torch.zeros(KV, D, dtype=torch.float64)
                k_mem, v_mem = torch.empty_like(k), torch.empty_like(v)
                for t in range(T):
                    ks = g[t] * ks + (1 - g[t]) * k[t]
                    vs = g[t] * vs + (1 - g[t]) * v[t]
                    k_mem[t], v_mem[t] = ks, vs
                k, v = k_mem, v_mem
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
            scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            attn = torch.einsum("hts,shd->thd", probs, v).reshape(T, H * D)
            if cfg.memory_output_gate:
                attn = attn * torch.sigmoid(lin("self_attn.og_proj", h))
            h = h + rms(lin("self_attn.o_proj", attn), w("post_attention_layernorm"))
            mlp = lin("mlp.down_proj", torch.nn.functional.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h))
            h = h + rms(mlp, w("post_feedforward_layernorm"))
        out.append(rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------
# Equations
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_memory_off_equals_olmo2(attn):
    model = make_model(attn=attn, memory=False)
    assert not any("g_proj" in n or "og_proj" in n for n in model.state_dict())
    stock = Olmo2ForCausalLM(Olmo2Config(**TINY)).eval()
    stock.set_attn_implementation(attn)
    stock.load_state_dict(model.state_dict(), strict=True)  # same weight names, nothing extra
    ids = tokens(2, 11)
    with torch.no_grad():
        ours, theirs = model(ids).logits, stock(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn,gate_bias,output_gate", [("sdpa", False, False), ("eager", True, True)])
def test_memory_matches_float64_reference(attn, gate_bias, output_gate):
    model = make_model(attn=attn, memory_gate_bias=gate_bias, memory_output_gate=output_gate)
    names = model.state_dict().keys()
    assert "model.layers.1.self_attn.g_proj.weight" in names
    assert ("model.layers.1.self_attn.g_proj.bias" in names) == gate_bias
    assert ("model.layers.1.self_attn.og_proj.weight" in names) == output_gate
    ids = tokens(2, 13)
    with torch.no_grad():
        logits = model(ids).logits
    ref = reference_logits(model, ids)
    torch.testing.assert_close(logits.double(), ref, rtol=0, atol=2e-5)
    # and the memory matters: off gives other logits
    model.config.memory = False
    with torch.no_grad():
        assert (model(ids).logits - logits).abs().max() > 1e-2


def test_output_gate_switch():
    base = make_model(seed=3)
    gated = make_model(seed=3, memory_output_gate=True)
    missing, unexpected = gated.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and all(".og_proj." in n for n in missing) and len(missing) == 2
    ids = tokens(2, 9)
    with torch.no_grad():
        for layer in gated.model.layers:  # sigmoid(0) = 1/2 on the attention output == o_proj halved
            layer.self_attn.og_proj.weight.zero_()
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.5)
        torch.testing.assert_close(gated(ids).logits, base(ids).logits, rtol=0, atol=1e-5)
    assert Olmo2MemoryConfig().memory_output_gate is False and Olmo2MemoryConfig().memory is True


def test_fallback_scan_agrees_with_kernels():
    from kernels import memory_scan, memory_scan_step
    gen = torch.Generator().manual_seed(0)
    g, k, v = (torch.randn(2, 37, 3, 8, generator=gen) * 2 for _ in range(3))
    s0 = (torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen))
    for init in (None, s0):
        ours = modeling.torch_memory_scan(g, k, v, initial_state=init, output_final_state=True)
        theirs = memory_scan(g, k, v, initial_state=init, output_final_state=True)
        for a, b in zip((*ours[:2], *ours[2]), (*theirs[:2], *theirs[2])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    ours, theirs = modeling.torch_memory_scan_step(g[:, 0], k[:, 0], v[:, 0], s0), memory_scan_step(
        g[:, 0], k[:, 0], v[:, 0], s0)
    for a, b in zip((*ours[:2], *ours[2]), (*theirs[:2], *theirs[2])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_model_with_fallback_scan_equals_kernels(monkeypatch):
    assert modeling.MEMORY_SCAN_FROM_KERNELS  # in-repo runs use kernels/
    model = make_model()
    ids = tokens(2, 10)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                  output_logits=True)
        monkeypatch.setattr(modeling, "memory_scan", modeling.torch_memory_scan)
        monkeypatch.setattr(modeling, "memory_scan_step", modeling.torch_memory_scan_step)
        got = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=0, atol=1e-5)


def test_training_loss_backward_reaches_gate():
    model = make_model(memory_gate_bias=True).train()
    ids = tokens(2, 8)
    loss = model(ids, labels=ids).loss
    loss.backward()
    gate = model.model.layers[0].self_attn.g_proj
    assert torch.isfinite(loss) and gate.weight.grad.abs().sum() > 0 and gate.bias.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Cache and generate
# ----------------------------------------------------------------------------------------------------

def test_generate_with_cache_equals_without_cache():
    model = make_model()
    ids = tokens(3, 12)
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert isinstance(cached.past_key_values, Olmo2MemoryCache)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=0, atol=1e-5)


def test_beam_search_with_cache_equals_without_cache():
    model = make_model(seed=5)
    ids = tokens(2, 7, seed=4)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_left_padded_batch_equals_single_prompts():
    model = make_model(seed=2)
    prompts = [tokens(1, 10, seed=7)[0], tokens(1, 6, seed=8)[0], tokens(1, 3, seed=9)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], **kw)
            assert torch.equal(batched.sequences[i, width:], single.sequences[0, len(p):])
            torch.testing.assert_close(torch.stack(batched.logits)[:, i], torch.stack(single.logits)[:, 0],
                                       rtol=0, atol=1e-4)


def test_chunked_prefill_equals_full_prefill():
    model = make_model(seed=4)
    ids = tokens(2, 14, seed=3)
    with torch.no_grad():
        full = model(ids, use_cache=True)
        cache = Olmo2MemoryCache(config=model.config)
        logits, start = [], 0
        for size in (5, 1, 6, 2):  # multi-token chunks after a cache, and a single-token step in between
            logits.append(model(ids[:, start:start + size], past_key_values=cache, use_cache=True).logits)
            start += size
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, rtol=0, atol=1e-5)
    ref = full.past_key_values
    for i in range(model.config.num_hidden_layers):
        assert cache.get_layer_keys(i).shape == (2, 2, 14, 8)
        torch.testing.assert_close(cache.get_layer_keys(i), ref.get_layer_keys(i), rtol=0, atol=1e-5)
        torch.testing.assert_close(cache.get_layer_values(i), ref.get_layer_values(i), rtol=0, atol=1e-5)
        for a, b in zip(cache.get_memory_state(i), ref.get_memory_state(i)):
            assert a.dtype == torch.float32 and a.shape == (2, 2, 8)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        # the state is the pre-RoPE last value of the memory: v~ has no RoPE, so it is the last cached v~
        torch.testing.assert_close(ref.get_memory_state(i)[1], ref.get_layer_values(i)[:, :, -1], rtol=0, atol=1e-6)


def test_cache_accessors_and_limits():
    model = make_model()
    ids = tokens(2, 6)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert cache.get_seq_length() == 6
    with pytest.raises(NotImplementedError):
        cache.crop(-2)
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.get_layer_keys(0).shape[0] == 1 and cache.get_memory_state(0)[0].shape[0] == 1
    keys, values = cache.get_layer_keys(0)[:, :, :3], cache.get_layer_values(0)[:, :, :3]
    cache.set_layer_keys_values(0, keys, values)
    assert cache.get_layer_keys(0).shape[2] == 3
    from transformers import DynamicCache
    with pytest.raises(TypeError, match="Olmo2MemoryCache"):
        model(ids, past_key_values=DynamicCache(), use_cache=True)


def test_bf16_runs():
    model = make_model().to(torch.bfloat16)
    ids = tokens(2, 9)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        full = model(out.sequences[:, :-1], use_cache=True)
    assert torch.isfinite(full.logits).all()
    assert full.past_key_values.get_layer_keys(0).dtype == torch.bfloat16
    assert full.past_key_values.get_memory_state(0)[0].dtype == torch.float32
    torch.testing.assert_close(torch.stack(out.logits, 1).float(), full.logits[:, -4:].float(), rtol=0, atol=5e-2)
    with torch.no_grad():
        ref = make_model()(ids).logits
        torch.testing.assert_close(model(ids).logits.float(), ref, rtol=0, atol=1e-1)


# ----------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# ----------------------------------------------------------------------------------------------------

CLEAN_LOAD = textwrap.dedent("""
    import sys
    repo = sys.argv[2]
    # forget our package: the editable-install finder and hook, and the repository root
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path = [p for p in sys.path if p and p.rstrip("/") != repo and "__editable__" not in p]
    sys.path_importer_cache.clear()
    for name in ("kernels", "ratplus_megatron"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} importable in the clean process")
    import torch
    from transformers import AutoModelForCausalLM
    path = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    module = sys.modules[type(model).__module__]
    assert type(model).__name__ == "Olmo2MemoryForCausalLM" and not module.MEMORY_SCAN_FROM_KERNELS
    assert not any(m.startswith(("ratplus_megatron", "kernels")) for m in sys.modules)
    ids = torch.load(path + "/ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
        seq = model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.save({"logits": logits, "seq": seq}, path + "/out.pt")
""")


def test_save_pretrained_loads_as_remote_code_in_clean_process(tmp_path):
    model = make_model(memory_gate_bias=True, memory_output_gate=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "olmo2_memory" and config["architectures"] == ["Olmo2MemoryForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_olmo2_memory.Olmo2MemoryConfig",
                                  "AutoModelForCausalLM": "modeling_olmo2_memory.Olmo2MemoryForCausalLM"}
    assert (tmp_path / "modeling_olmo2_memory.py").exists() and (tmp_path / "configuration_olmo2_memory.py").exists()
    ids = tokens(2, 10)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
        seq = model.generate(ids, max_new_tokens=4, do_sample=False)

    # in this process, through the registered Auto classes
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Olmo2MemoryConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is Olmo2MemoryForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=1e-6)

    # in a fresh process without our package (the modeling file falls back to its torch scan)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    script = tmp_path / "clean_load.py"
    script.write_text(CLEAN_LOAD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["logits"], logits, rtol=0, atol=1e-5)
    assert torch.equal(out["seq"], seq)


def test_olmo2_7b_shapes_on_meta_device():
    config = Olmo2MemoryConfig(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                               rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                               pad_token_id=100277, eos_token_id=100257)
    with torch.device("meta"):
        model = Olmo2MemoryForCausalLM(config)
    gates = {n: p.shape for n, p in model.named_parameters() if ".g_proj." in n}
    assert len(gates) == 32 and gates["model.layers.31.self_attn.g_proj.weight"] == (4096, 4096)
    assert sum(p.numel() for p in gates.values()) == 32 * 4096 ** 2  # 537M extra parameters
