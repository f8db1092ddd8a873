"""Helpers shared by the TP=1 side (pytest) and the TP/PP=N side (tp_worker.py)."""
import re

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from ratplus_megatron.config import MemoryConfig, preset


def model_config(case):
    return preset("tiny", **case["model"], memory=MemoryConfig(**case["memory"]))


def build(case):
    from ratplus_megatron.model import build_model, to_transformer_config

    cfg = model_config(case)
    pp = case.get("pp", 1)
    tconfig = to_transformer_config(cfg, tp=case["tp"], pp=pp, sequence_parallel=case.get("sp", False))
    return build_model(cfg, tconfig, use_te=False,
                       pre_process=parallel_state.is_pipeline_first_stage(),
                       post_process=parallel_state.is_pipeline_last_stage())


def logits_and_grads(model, ids, proj):
    """Full-vocab logits; backward of sum(logits * proj) leaves gradients on the parameters.

    With pipeline parallelism the stages are driven by hand (megatron's schedules need CUDA):
    hidden states go forward stage to stage, their gradients come back. Every rank returns the
    last stage's logits.
    """
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    model.zero_grad(set_to_none=True)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    prev = parallel_state.get_pipeline_model_parallel_prev_rank()
    nxt = parallel_state.get_pipeline_model_parallel_next_rank()
    hidden_in = None
    if not first:
        shape = (ids.shape[1], ids.shape[0], model.config.hidden_size)
        hidden_in = torch.empty(shape)
        torch.distributed.recv(hidden_in, src=prev)
        hidden_in.requires_grad_()
        model.set_input_tensor(hidden_in)
    out = model(ids, pos, None)
    if last:
        logits = gather_from_tensor_model_parallel_region(out)
        (logits.double() * proj).sum().backward()
        logits = logits.detach().double()
    else:
        torch.distributed.send(out.detach().contiguous(), dst=nxt)
        grad = torch.empty_like(out)
        torch.distributed.recv(grad, src=nxt)
        out.backward(grad)
        logits = torch.empty(proj.shape, dtype=torch.float64)
    if not first:
        torch.distributed.send(hidden_in.grad.contiguous(), dst=prev)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return logits


def _global_name(model, name: str) -> str:
    """decoder.layers.<local>.x -> decoder.layers.<global>.x (megatron's layer_number is global, 1-based)."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        return name
    return f"decoder.layers.{model.decoder.layers[int(m.group(1))].layer_number - 1}.{m.group(2)}"


def full_gradients(model):
    """Each parameter's gradient in the TP=1, PP=1 layout, on every rank.

    TP shards are all-gathered along their partition dim; pipeline stages' dicts are merged.
    """
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
        out[_global_name(model, name)] = g
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(stages, out, group=parallel_state.get_pipeline_model_parallel_group())
        out = {k: v for stage in stages for k, v in stage.items()}
    return out
