"""torchrun worker for test_tensor_parallel's fused-gate checks at TP=2 with sequence parallelism.

Usage: torchrun --standalone --nproc-per-node 2 tests/tp_fused_worker.py CASE_DIR
CASE_DIR holds case.json and attention_ckpt/ (an attention-only model saved at TP=1) with its
weights in attention.pt. Rank 0 writes result.json with
  comm: per model variant, the TP collectives of one forward and of one backward, counted where
        megatron's layers and mappings call them (all-gather, reduce-scatter);
  init_from: the load_model_only report of the attention checkpoint into a memory model at TP=2,
        and the largest differences of the gathered q/k/v rows (to the checkpoint) and gate rows
        and bias (to the identity init).
"""
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def count_collectives():
    """Wrap megatron's all-gather / reduce-scatter entry points; returns the live counter."""
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers, mappings

    counts = Counter()

    def counted(kind, fn):
        def call(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)
        return call

    for module in (layers, mappings, utils):
        for name, kind in (("dist_all_gather_func", "all_gather"), ("dist_reduce_scatter_func", "reduce_scatter")):
            if hasattr(module, name):
                setattr(module, name, counted(kind, getattr(module, name)))
    return counts


def build(case, memory, seed):
    from megatron.core import tensor_parallel

    from ratplus_megatron.config import MemoryConfig, preset
    from ratplus_megatron.model import build_model, to_transformer_config

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    cfg = preset("tiny", **case["model"], memory=MemoryConfig(**memory))
    return build_model(cfg, to_transformer_config(cfg, tp=2, sequence_parallel=True), use_te=False), cfg


def gather_rows(t):
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(group.size())]
    torch.distributed.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts)


def main(case_dir: Path):
    import faulthandler
    faulthandler.dump_traceback_later(240, exit=True)
    case = json.loads((case_dir / "case.json").read_text())
    from ratplus_megatron.parallel import init_parallel
    from ratplus_megatron.qkv_layout import qkv_parts, qkv_parts_for, split_groups
    from ratplus_megatron.train.checkpoint import load_model_only

    init_parallel(tp=2, pp=1)
    counts = count_collectives()
    result = {"comm": {}}
    ids = torch.randint(0, 128, (2, case["seq"]), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(case["seq"])[None].expand_as(ids)
    for name, memory in case["variants"].items():
        model, _ = build(case, memory, seed=1)
        counts.clear()
        out = model(ids, pos, None)
        forward = dict(counts)
        counts.clear()
        out.float().square().mean().backward()
        result["comm"][name] = {"forward": forward, "backward": dict(counts)}

    model, cfg = build(case, case["init_from_memory"], seed=2)
    report = load_model_only(str(case_dir / "attention_ckpt"), [model])
    attention = torch.load(case_dir / "attention.pt")
    errs = {"qkv": 0.0, "gate_rows": 0.0, "gate_bias": 0.0}
    for i, layer in enumerate(model.decoder.layers):
        attn = layer.self_attention
        got = split_groups(gather_rows(attn.linear_qkv.weight), qkv_parts_for(cfg))
        plain = qkv_parts(cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, output_gate=False, memory=False)
        want = split_groups(attention[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], plain)
        for part in want:
            errs["qkv"] = max(errs["qkv"], (got[part] - want[part]).abs().max().item())
        errs["gate_rows"] = max(errs["gate_rows"], got["g"].abs().max().item())
        bias = gather_rows(attn.memory_gate_bias)
        errs["gate_bias"] = max(errs["gate_bias"], (bias - cfg.memory.identity_bias).abs().max().item())
    result["init_from"] = {"report": report, "errors": errs}
    if torch.distributed.get_rank() == 0:
        (case_dir / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
