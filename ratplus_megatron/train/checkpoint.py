"""Checkpoints: megatron dist_checkpointing for model and optimizer, per-rank files for the RNG states.

Layout of a run directory SAVE:

    SAVE/latest_checkpointed_iteration.txt   the last complete checkpoint's iteration (written last, atomically)
    SAVE/iter_0000100/                       dist checkpoint: {"model": ..., "optimizer": ...}
    SAVE/iter_0000100/trainer_state.json     iteration, consumed samples, config (human readable)
    SAVE/iter_0000100/rank_00000.pt          per rank: RNG states

On GPUs the distributed optimizer's state is saved "dp_reshardable" (each rank writes its own
buffers, no gathering: the fast default, resumable at another data-parallel size only) or, with
checkpoint.optimizer_sharding=fully_reshardable, gathered into per-parameter tensors that a run at
any TP / PP / DP layout can resume from (megatron's two formats). The CPU trainer's torch AdamW is
saved "torch_per_parameter": each moment tensor keyed and sharded like its parameter, so it
resumes at any TP / DP. (CPU checkpoints written before that kept the AdamW state in the per-rank
files: they resume at their own layout only.) trainer_state.json records the format and the layout,
so `load` asks for what was written and refuses a layout the format cannot serve. After a layout
change the per-rank RNG files are not restored (they belong to other ranks).

Model tensors keep megatron's global keys whatever the dict nesting, so a training checkpoint is
also a valid `init_from` (model-only) source, and so is `convert hf-to-mcore`'s output. An
attention-only checkpoint initialises a memory model too: its q/k/v rows go into their places in
the memory model's larger fused linear_qkv, the gate rows start fresh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch

from ..files import write_atomic
from ..qkv_layout import unfused_gate_error
from .config import TrainConfigError

LATEST = "latest_checkpointed_iteration.txt"
TORCH_PER_PARAMETER = "torch_per_parameter"  # the CPU trainer's AdamW state in the dist checkpoint


def iter_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def latest_iteration(save: str | None) -> int | None:
    if not save:
        return None
    path = os.path.join(save, LATEST)
    if not os.path.isfile(path):
        return None
    return int(open(path).read().strip())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        torch.cuda.set_rng_state(state["cuda"])
        get_cuda_rng_tracker().set_states(state["tracker"])


def _model_sharded_state_dict(models) -> dict:
    if len(models) == 1:
        return models[0].sharded_state_dict()
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def save(save_dir: str, iteration: int, models, optimizer, *, megatron_optimizer: bool, trainer_state: dict,
         rank: int, optimizer_sharding: str = "dp_reshardable") -> str:
    """Write SAVE/iter_XXXXXXX on every rank, then (rank 0) point the latest file at it."""
    from megatron.core import dist_checkpointing

    path = iter_dir(save_dir, iteration)
    if rank == 0:
        if os.path.exists(path):  # left over from a save that died half-way
            shutil.rmtree(path)
        os.makedirs(path)
    torch.distributed.barrier()
    model_sd = _model_sharded_state_dict(models)
    state = {"model": model_sd}
    if megatron_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, metadata={"distrib_optim_sharding_type": optimizer_sharding})
    else:
        state["optimizer"] = _torch_optimizer_sharded_state(optimizer, model_sd, models)
    dist_checkpointing.save(state, path)
    torch.save({"rng": rng_state()}, os.path.join(path, f"rank_{rank:05d}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        trainer_state = {**trainer_state,
                         "optimizer_sharding": optimizer_sharding if megatron_optimizer else TORCH_PER_PARAMETER}
        state = json.dumps(trainer_state, indent=1, default=str)
        write_atomic(os.path.join(path, "trainer_state.json"), lambda f: f.write(state))
        write_atomic(os.path.join(save_dir, LATEST), lambda f: f.write(f"{iteration}\n"))
    torch.distributed.barrier()
    return path


def load(save_dir: str, iteration: int, models, optimizer, *, megatron_optimizer: bool, rank: int,
         layout: dict | None = None) -> dict:
    """Restore model, optimizer and RNG from SAVE/iter_XXXXXXX; returns its trainer_state.

    ``layout`` ({"tp", "pp", "dp"}) is this run's; a checkpoint written at another one resumes when
    its optimizer format allows it (see the module docstring), else a one-line error says what to do."""
    from megatron.core import dist_checkpointing

    path = iter_dir(save_dir, iteration)
    old_layout = unfused_gate_error(dist_checkpointing.load_tensors_metadata(path), f"checkpoint {path}")
    if old_layout:
        raise RuntimeError(old_layout)
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    saved_layout = trainer_state.get("layout")  # absent in checkpoints written before it was recorded
    same_layout = layout is None or saved_layout is None or saved_layout == layout
    # None: written before the format was recorded (on CPU: AdamW in the per-rank files). A recorded
    # null is a CPU checkpoint (GPU runs recorded their format from the start of the record).
    sharding = trainer_state.get("optimizer_sharding")
    cpu_state = sharding == TORCH_PER_PARAMETER or ("optimizer_sharding" in trainer_state and sharding is None)
    gpu_state = sharding in ("dp_reshardable", "fully_reshardable")
    if (cpu_state and megatron_optimizer) or (gpu_state and not megatron_optimizer):
        raise TrainConfigError(f"checkpoint {path} holds the {'CPU' if cpu_state else 'GPU'} trainer's optimizer "
                               f"state ({sharding or 'per-rank files'}); this run is on "
                               f"{'GPUs' if megatron_optimizer else 'CPU'}: start from its weights with "
                               "checkpoint.init_from")
    if megatron_optimizer:
        sharding = sharding or "dp_reshardable"
    if not same_layout:
        where = f"checkpoint {path} was written at {_layout_str(saved_layout)}; this run is {_layout_str(layout)}"
        if not megatron_optimizer and sharding is None:
            raise TrainConfigError(f"{where}: it keeps the torch optimizer in per-rank files (written before "
                                   f"{TORCH_PER_PARAMETER}), which do not reshard; resume at the same layout, "
                                   "or start from its weights with checkpoint.init_from")
        moved = (saved_layout["tp"], saved_layout["pp"]) != (layout["tp"], layout["pp"])
        if megatron_optimizer and moved and sharding != "fully_reshardable":
            raise TrainConfigError(f"{where}: its optimizer state ({sharding}) reshards across data parallelism only; "
                               "save with checkpoint.optimizer_sharding=fully_reshardable to change TP or PP, "
                               "or start from its weights with checkpoint.init_from")
    model_sd = _model_sharded_state_dict(models)
    request = {"model": model_sd}
    if megatron_optimizer:
        prime_torch_adam(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata={"distrib_optim_sharding_type": sharding})
    elif sharding == TORCH_PER_PARAMETER:
        request["optimizer"] = _torch_optimizer_sharded_state(optimizer, model_sd, models)
    state = dist_checkpointing.load(request, path)
    _load_model_state(models, state["model"], strict=True)
    if megatron_optimizer:
        with _torch_adam_step_kept(optimizer, sharding):
            optimizer.load_state_dict(state["optimizer"])
        _unshare_torch_adam_steps(optimizer)
    elif sharding == TORCH_PER_PARAMETER:
        _load_torch_optimizer(optimizer, state["optimizer"])
    local_file = os.path.join(path, f"rank_{rank:05d}.pt")
    if same_layout:
        if not os.path.isfile(local_file):
            raise TrainConfigError(f"{local_file} is missing: " + (
                "resume with the world size the checkpoint was written at (its layout is not recorded)"
                if saved_layout is None else
                "the checkpoint is incomplete (each rank writes its RNG states there); resume from an "
                "earlier iteration"))
        local = torch.load(local_file, weights_only=False)
        if sharding is None:  # a CPU checkpoint from before TORCH_PER_PARAMETER
            if "optimizer" not in local:
                raise TrainConfigError(f"checkpoint {path} holds no CPU optimizer state (a GPU run's?): start from "
                                       "its weights with checkpoint.init_from")
            optimizer.load_state_dict(local["optimizer"])
        set_rng_state(local["rng"])
    trainer_state["rng_restored"] = same_layout
    return trainer_state


def _layout_str(layout: dict) -> str:
    return f"TP={layout['tp']} PP={layout['pp']} DP={layout['dp']}"


def _torch_adams(optimizer):
    """(megatron optimizer, its torch Adam/AdamW) for each optimizer in the chain that wraps one:
    megatron without TE or apex; TE's and apex's FusedAdam are not yielded."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield opt, inner


def _torch_optimizer_sharded_state(optimizer, model_sd, models) -> dict:
    """The CPU trainer's torch AdamW as a sharded state dict: exp_avg / exp_avg_sq of each parameter
    keyed and sharded like the parameter (megatron's helpers, as its non-distributed optimizers do),
    so that any TP / DP layout loads its own pieces; each parameter's step count by its parameter
    name (rank 0's copy: the CPU trainer has no pipeline stages, so every rank has every name; the
    sharded keys would not do, megatron stacks the layers under one key).
    Parameters without state yet get the state of step 0 first, so that a save and a load request
    have the same entries."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    _prime_adam_state(optimizer)
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for m in models for n, p in _unwrap(m).named_parameters()}
    param_names = {i: names[id(p)] for i, p in enumerate(params)}
    steps = {param_names[i]: float(st["step"]) for i, st in sd["state"].items()}
    optim_state_to_sharding_state(sd, get_param_id_to_sharded_param_map(model_sd, params), exclude_keys=("step",))
    sd["steps"] = steps
    sd["param_names"] = LocalNonpersistentObject(param_names)
    return sd


def _load_torch_optimizer(optimizer, loaded: dict) -> None:
    """Inverse of _torch_optimizer_sharded_state, after dist_checkpointing.load filled it."""
    names, steps = loaded["param_names"], loaded["steps"]
    state = {i: {**st, "step": torch.tensor(steps[names[i]])} for i, st in loaded["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": loaded["param_groups"]})


def _prime_adam_state(adam) -> None:
    """Adam's state of step 0 for every parameter that has none yet (what its first step would make)."""
    for group in adam.param_groups:
        on_device = group.get("fused") or group.get("capturable")  # where Adam keeps its step
        for p in group["params"]:
            if p not in adam.state or not adam.state[p]:
                step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                adam.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def prime_torch_adam(optimizer) -> None:
    """Give a torch Adam inside megatron's optimizer the state of step 0 where it has none yet.

    Without TE or apex, megatron's DistributedOptimizer wraps torch's Adam, whose per-parameter
    state (with its "step") only appears at the first step; the optimizer's state_dict(), which
    sharded_state_dict(is_loading=True) calls to build the load request, then fails
    (``assert len(steps) == 1``): a fresh process could not resume. This is the state Adam's first
    step would create; the load overwrites all of it. TE's and apex's FusedAdam are left alone.
    """
    for _, inner in _torch_adams(optimizer):
        if not inner.state:
            _prime_adam_state(inner)


@contextlib.contextmanager
def _torch_adam_step_kept(optimizer, sharding: str):
    """megatron-core 0.19 cannot load a fully_reshardable optimizer state into torch's Adam (no TE
    or apex): the checkpoint leaves out Adam's per-parameter "step" tensor (the step count travels
    in the param groups) and ``_set_main_param_and_optimizer_states`` then looks it up (KeyError:
    'step', seen on the H200). While loading, each parameter's current step tensor is passed in as
    its own source, so the copy is a no-op and the step comes from the param groups as usual."""
    patched = []
    if sharding == "fully_reshardable":
        for opt, _ in _torch_adams(optimizer):
            if not hasattr(opt, "model_param_group_index_map"):
                continue
            if getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
                continue  # that branch sets each given state by name: leave it alone

            def setter(model_param, tensors, _opt=opt, _orig=opt._set_main_param_and_optimizer_states):
                if "step" not in tensors:
                    group, order = _opt.model_param_group_index_map[model_param]
                    step = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]].get("step")
                    if isinstance(step, torch.Tensor):
                        tensors = {**tensors, "step": step}
                return _orig(model_param, tensors)

            opt._set_main_param_and_optimizer_states = setter
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method


def _unshare_torch_adam_steps(optimizer) -> None:
    """megatron-core 0.19 restores torch Adam's step count (no TE or apex) as ONE tensor placed in
    every parameter's state; Adam increments each parameter's step in place, so after a resume the
    shared count would grow by the number of parameters per step and distort the bias correction.
    Give every parameter its own copy."""
    for _, inner in _torch_adams(optimizer):
        for st in inner.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def _load_model_state(models, state: dict, strict: bool):
    if len(models) == 1:
        return models[0].load_state_dict(state, strict=strict)
    for i, m in enumerate(models):
        m.load_state_dict(state[f"model{i}"], strict=strict)


def _unwrap(model):
    """The module megatron's wrappers (DDP, Float16Module) hold."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _qkv_layout_requests(model_sd: dict, ckpt_meta: dict, config) -> dict:
    """Requests for the fused qkv tensors the checkpoint holds in another row layout than this model.

    The layouts differ by whole parts of each query group (ratplus_megatron.qkv_layout): an
    attention-only checkpoint has [q, k, v], a memory model [q, k, v, g]. For each such tensor the
    request becomes a buffer in the checkpoint's layout, shard for shard (TP shards are whole groups),
    and the parts both layouts have are copied over after loading. Returns {state dict name:
    (model ShardedTensor, checkpoint parts, model parts)}; model_sd is changed in place.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from ..qkv_layout import guess_parts, qkv_parts, rows_per_group

    heads, groups, hn = config.num_attention_heads, config.num_query_groups, config.kv_channels
    mine = qkv_parts(heads, groups, hn, output_gate=config.attention_output_gate,
                     memory=getattr(config, "memory", False))
    out = {}
    for name, sh in list(model_sd.items()):
        if not (isinstance(sh, ShardedTensor) and sh.key.endswith("self_attention.linear_qkv.weight")
                and sh.key in ckpt_meta and sh.flattened_range is None):
            continue
        theirs_shape = tuple(ckpt_meta[sh.key].global_shape)
        axis = sh.prepend_axis_num  # the rows, in global coordinates
        if theirs_shape == tuple(sh.global_shape) or len(theirs_shape) != len(sh.global_shape):
            continue
        theirs = guess_parts(theirs_shape[axis], heads, groups, hn)
        if theirs is None or theirs_shape[:axis] + theirs_shape[axis + 1:] != \
                tuple(sh.global_shape[:axis]) + tuple(sh.global_shape[axis + 1:]):
            continue  # not a layout difference: dist_checkpointing reports the mismatch
        ours_per_group, theirs_per_group = rows_per_group(mine), rows_per_group(theirs)
        buf = torch.empty((sh.local_shape[0] // ours_per_group * theirs_per_group, *sh.local_shape[1:]),
                          dtype=sh.data.dtype, device=sh.data.device)
        offset = list(sh.global_offset)  # this shard's first group, counted in their rows
        offset[axis] = offset[axis] // ours_per_group * theirs_per_group
        model_sd[name] = dataclasses.replace(sh, data=buf, local_shape=tuple(buf.shape),
                                             global_shape=theirs_shape, global_offset=tuple(offset))
        out[name] = (sh, theirs, mine)
    return out


def load_model_only(path: str, models) -> dict:
    """Model weights from a dist checkpoint (convert hf-to-mcore's output, or a training checkpoint).

    Tensors the checkpoint lacks (e.g. the memory gate bias when adding memory to plain OLMo2) keep
    this model's initialisation, and so do rows of the fused linear_qkv the checkpoint lacks (the
    memory gate's rows, from an attention-only checkpoint; the q/k/v rows are loaded into their
    places). Returns {"fresh": checkpoint keys this model initialised itself, "ignored_from_checkpoint":
    checkpoint keys this model has no use for, "not_loaded_params": parameter names left at their
    initialisation}; a tensor loaded in part is listed as "KEY[g rows]" (the parts in question).
    Optimizer state is not read.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from ..qkv_layout import copy_common_parts

    if os.path.isfile(os.path.join(path, LATEST)):  # a run directory: take its latest checkpoint
        path = iter_dir(path, int(open(os.path.join(path, LATEST)).read().strip()))
    if len(models) != 1:
        raise NotImplementedError("init_from with virtual pipeline stages is not supported")
    # megatron's Float16Module (the bf16 wrapper on GPU) returns None from load_state_dict: load
    # into the model it wraps, whose keys the sharded state dict already uses.
    target = _unwrap(models[0])
    ckpt_meta = dist_checkpointing.load_tensors_metadata(path)
    if getattr(target.config, "memory", False):  # an attention model may drop an old gate; ours would lose it
        old_layout = unfused_gate_error(ckpt_meta, f"checkpoint {path}")
        if old_layout:
            raise RuntimeError(old_layout)
    model_sd = models[0].sharded_state_dict()
    adapted = _qkv_layout_requests(model_sd, ckpt_meta, target.config)
    state, missing, unexpected = dist_checkpointing.load(model_sd, path, strict=StrictHandling.RETURN_ALL)
    # `missing` in megatron's wording are checkpoint keys this model does not ask for ("unexpected"
    # for us), and vice versa; we report in the model's terms.
    fresh, partly_fresh = set(unexpected), []
    ignored = {k for k in missing if not k.startswith("optimizer.")}  # a training checkpoint's optimizer
    for name, (sh, theirs, mine) in adapted.items():
        merged = sh.data.detach().clone()  # this model's initialisation, for the rows the checkpoint lacks
        new_parts, unused_parts = copy_common_parts(merged, mine, state[name], theirs)
        state[name] = merged
        if new_parts:
            fresh.add(f"{sh.key}[{'/'.join(new_parts)} rows]")
            partly_fresh.append(f"{name}[{'/'.join(new_parts)} rows]")
        if unused_parts:
            ignored.add(f"{sh.key}[{'/'.join(unused_parts)} rows]")
    result = target.load_state_dict(state, strict=False)
    # TE modules' `_extra_state` (FP8 scaling metadata) is not a parameter and starts fresh
    not_loaded = sorted({k for k in result.missing_keys if not k.endswith("._extra_state")} | set(partly_fresh))
    return {"fresh": sorted(fresh), "ignored_from_checkpoint": sorted(ignored), "not_loaded_params": not_loaded}
