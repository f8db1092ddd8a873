"""Helpers shared by the TP=1 side (pytest) and the TP=N side (tp_worker.py)."""
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from ratplus_megatron.config import MemoryConfig, preset


def model_config(case):
    return preset("tiny", **case["model"], memory=MemoryConfig(**case["memory"]))


def build(case):
    from ratplus_megatron.model import build_model, to_transformer_config

    cfg = model_config(case)
    return build_model(cfg, to_transformer_config(cfg, tp=case["tp"]), use_te=False)


def logits_and_grads(model, ids, proj):
    """Full-vocab logits; backward of sum(logits * proj) leaves gradients on the parameters."""
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    model.zero_grad(set_to_none=True)
    logits = gather_from_tensor_model_parallel_region(model(ids, pos, None))
    (logits.double() * proj).sum().backward()
    return logits.detach().double()


def full_gradients(model):
    """Each parameter's gradient in the TP=1 layout (all-gathered along its TP partition dim)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().double()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g.contiguous(), group=group)
            if name.endswith("mlp.linear_fc1.weight"):
                # each rank holds [gate_r; up_r]; the TP=1 layout is [gate; up]
                halves = [pt.chunk(2) for pt in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g
    return out
