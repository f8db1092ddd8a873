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


def test_init_from_reports_the_new_memory_gate(tmp_path):
    """Plain OLMo2 weights into a memory model: the gate starts fresh and is reported as such."""
    from megatron.core import dist_checkpointing

    from ratplus_megatron.train.checkpoint import load_model_only

    plain, _ = _model(preset("tiny", **TINY), PrecisionConfig(bf16=False), seed=1)
    dist_checkpointing.save(plain.sharded_state_dict(), str(tmp_path))
    model, _ = _model(preset("tiny", **TINY, memory=MemoryConfig(enabled=True)), PrecisionConfig(bf16=False), seed=2)
    report = load_model_only(str(tmp_path), [model])
    assert report["fresh"] and all("linear_gate" in k for k in report["fresh"]), report
    assert report["not_loaded_params"] and all("linear_gate" in k for k in report["not_loaded_params"]), report
    assert not report["ignored_from_checkpoint"]
