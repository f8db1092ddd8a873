"""`checkpoint.init_from` loads model-only weights through the wrappers the GPU trainer uses.

On GPU the trainer's model is DDP(Float16Module(GPTModel)); Float16Module.load_state_dict returns
None, which crashed `load_model_only` on the first GPU run with init_from. Float16Module runs on CPU
in bf16, so the real wrapper is tested here.
"""
import dataclasses

import pytest
import torch

from ratplus_megatron.config import MemoryConfig, PrecisionConfig, preset

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=4, head_dim=16,
            ffn_hidden_size=96, vocab_size=128, max_position_embeddings=64)
GQA = {**TINY, "num_kv_heads": 2}  # two q heads per query group: the fused layout's rows differ by part


def _model(cfg, precision, seed):
    from megatron.core import tensor_parallel

    from ratplus_megatron.model import build_model, to_transformer_config

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    tconfig = to_transformer_config(cfg, precision)
    return build_model(cfg, tconfig, use_te=False), tconfig


@pytest.mark.parametrize("memory", [False, True], ids=["attention", "memory"])
def test_init_from_through_float16module(tmp_path, memory):
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.module import Float16Module

    from ratplus_megatron.train.checkpoint import load_model_only

    cfg = preset("tiny", **TINY, memory=MemoryConfig(enabled=memory))
    source, _ = _model(cfg, PrecisionConfig(bf16=False), seed=1)
    dist_checkpointing.save(source.sharded_state_dict(), str(tmp_path))

    inner, tconfig = _model(cfg, PrecisionConfig(bf16=False), seed=2)
    wrapped = Float16Module(dataclasses.replace(tconfig, bf16=True), inner)  # what build_gpu wraps
    report = load_model_only(str(tmp_path), [wrapped])
    assert report == {"fresh": [], "ignored_from_checkpoint": [], "not_loaded_params": []}
    want = dict(source.named_parameters())
    for name, p in wrapped.module.named_parameters():
        torch.testing.assert_close(p, want[name].to(p.dtype), msg=name)


@pytest.mark.parametrize("memory", [MemoryConfig(enabled=True),
                                    MemoryConfig(enabled=True, gate_init="identity", output_gate=True)],
                         ids=["gate", "identity-gate+bias+output-gate"])
def test_init_from_attention_checkpoint_into_memory_model(tmp_path, memory):
    """Plain OLMo2 weights into a memory model: q/k/v load into their rows of the larger fused
    linear_qkv, the gate rows (and the output gate's, and the gate bias) keep the memory model's
    initialisation and are reported as fresh; every other tensor loads exactly."""
    from megatron.core import dist_checkpointing

    from ratplus_megatron.qkv_layout import qkv_parts_for, split_groups
    from ratplus_megatron.train.checkpoint import load_model_only

    plain_cfg = preset("tiny", **GQA)
    plain, _ = _model(plain_cfg, PrecisionConfig(bf16=False), seed=1)
    dist_checkpointing.save(plain.sharded_state_dict(), str(tmp_path))
    cfg = preset("tiny", **GQA, memory=memory)
    model, _ = _model(cfg, PrecisionConfig(bf16=False), seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = load_model_only(str(tmp_path), [model])

    new = "og/g" if memory.output_gate else "g"
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    bias = ["decoder.layers.self_attention.memory_gate_bias"] if memory.has_gate_bias else []
    assert report["fresh"] == sorted([f"{qkv}[{new} rows]"] + bias), report
    layer_names = lambda suffix: [f"decoder.layers.{i}.self_attention.{suffix}" for i in range(cfg.num_layers)]  # noqa: E731
    assert report["not_loaded_params"] == sorted(layer_names(f"linear_qkv.weight[{new} rows]")
                                                 + (layer_names("memory_gate_bias") if bias else [])), report
    assert report["ignored_from_checkpoint"] == []

    source = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("linear_qkv.weight"):
            got, want = split_groups(p, qkv_parts_for(cfg)), split_groups(source[name], qkv_parts_for(plain_cfg))
            init = split_groups(before[name], qkv_parts_for(cfg))
            for part in got:
                torch.testing.assert_close(got[part], want[part] if part in want else init[part], rtol=0, atol=0,
                                           msg=f"{name} {part}")
            if memory.gate_init == "identity":
                assert got["g"].abs().max() == 0
            else:
                assert abs(got["g"].std().item() - memory.gate_init_std) < 0.2 * memory.gate_init_std
        elif name.endswith("memory_gate_bias"):
            torch.testing.assert_close(p, torch.full_like(p, memory.identity_bias), rtol=0, atol=0)
        else:
            torch.testing.assert_close(p, source[name], rtol=0, atol=0, msg=name)


def test_init_from_memory_checkpoint_into_attention_model(tmp_path):
    """The other way: the gate rows and bias are reported as not used, q/k/v load exactly."""
    from megatron.core import dist_checkpointing

    from ratplus_megatron.qkv_layout import qkv_parts_for, split_groups
    from ratplus_megatron.train.checkpoint import load_model_only

    mem_cfg = preset("tiny", **GQA, memory=MemoryConfig(enabled=True, gate_bias=True))
    source, _ = _model(mem_cfg, PrecisionConfig(bf16=False), seed=1)
    dist_checkpointing.save(source.sharded_state_dict(), str(tmp_path))
    cfg = preset("tiny", **GQA)
    model, _ = _model(cfg, PrecisionConfig(bf16=False), seed=2)
    report = load_model_only(str(tmp_path), [model])
    assert report == {"fresh": [], "not_loaded_params": [],
                      "ignored_from_checkpoint": ["decoder.layers.self_attention.linear_qkv.weight[g rows]",
                                                  "decoder.layers.self_attention.memory_gate_bias"]}
    want = dict(source.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("linear_qkv.weight"):
            got, src = split_groups(p, qkv_parts_for(cfg)), split_groups(want[name], qkv_parts_for(mem_cfg))
            for part in got:
                torch.testing.assert_close(got[part], src[part], rtol=0, atol=0)
        else:
            torch.testing.assert_close(p, want[name], rtol=0, atol=0, msg=name)


def test_unfused_gate_checkpoint_is_a_clear_error(tmp_path):
    """A memory checkpoint from before the gate rows moved into linear_qkv (its own linear_gate) is
    refused with a way out, not loaded with a freshly initialised gate."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from ratplus_megatron.train.checkpoint import load_model_only

    plain, _ = _model(preset("tiny", **TINY), PrecisionConfig(bf16=False), seed=1)
    old = plain.sharded_state_dict()
    gate = torch.zeros(TINY["num_layers"], TINY["num_kv_heads"] * TINY["head_dim"], TINY["hidden_size"])
    old["gate"] = ShardedTensor.from_rank_offsets("decoder.layers.self_attention.linear_gate.weight", gate)
    dist_checkpointing.save(old, str(tmp_path))
    model, _ = _model(preset("tiny", **TINY, memory=MemoryConfig(enabled=True)), PrecisionConfig(bf16=False), seed=2)
    with pytest.raises(RuntimeError, match="written before the memory gate's rows moved into linear_qkv.*"
                                           "mcore-to-hf.*hf-to-mcore"):
        load_model_only(str(tmp_path), [model])
