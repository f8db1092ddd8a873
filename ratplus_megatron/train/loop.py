"""The trainer: read top to bottom.

    python -m ratplus_megatron.train --config configs/tiny_ratplus_cpu.yaml [section.key=value ...]

1. parse the recipe (errors are one line, before anything heavy is imported)
2. set up torch.distributed and megatron's TP/PP/DP groups (torchrun, Slurm, or one process)
3. build the model; on GPU wrap it in megatron's bf16 module and DistributedDataParallel and
   build megatron's distributed optimizer; on CPU use torch's AdamW
4. build the datasets (megatron GPTDataset; order fixed by the number of consumed samples)
5. resume from SAVE's latest checkpoint, or initialise from `init_from`
6. loop: LR from the schedule -> forward/backward over the micro-batches -> grad sync, clip,
   step -> log -> validate -> checkpoint -> stop on SIGTERM/SIGUSR1 (save, exit 0, requeue marker)

The GPU step uses megatron's pipeline schedules (`get_forward_backward_func`); the CPU step is a
plain loop over micro-batches (megatron's schedules, DDP and optimizer need CUDA), used by CI and
the quickstart. Both compute the same loss: per micro-batch token mean, averaged over
micro-batches and data-parallel ranks.
"""
from __future__ import annotations

import argparse
import json
import math
import secrets
import os
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial

from .config import TrainConfig, TrainConfigError, load_config

REQUEUE_MARKER = "requeue_requested"  # written into SAVE when a signal stopped the run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ratplus_megatron.train",
                                description="Train OLMo2 (+ RAT+ memory) with megatron-core.")
    p.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.train_iters=100 model.memory.enabled=true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from ..parallel import distributed_env

        _, world, _, _ = distributed_env()
        cfg.validate(world_size=world)
        return train(cfg)
    except TrainConfigError as e:  # found before or during setup: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        if "megatron.core" in sys.modules:  # set up already: leave the process groups cleanly
            from ..parallel import destroy_parallel

            destroy_parallel()
        return 2


# ------------------------------------------------------------------------------------------ run

def train(cfg: TrainConfig) -> int:
    import torch
    from megatron.core import parallel_state as ps

    from ..parallel import destroy_parallel, init_parallel
    from . import checkpoint as ckpt
    from .data import build_datasets, build_probe, dilated_attention_mask
    from .flops import flops_per_token
    from .schedule import learning_rate

    # ---- 1. processes and groups
    cuda = torch.cuda.is_available()
    if not cuda and cfg.parallel.pp > 1:
        raise TrainConfigError("parallel.pp > 1 needs GPUs (megatron's pipeline schedules are CUDA-only); use pp=1 on CPU")
    if not cuda and cfg.precision.bf16:
        raise TrainConfigError("precision.bf16=true needs a GPU; set precision.bf16=false for CPU runs")
    rank, world = init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.train.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    log = Logger(cfg, rank)
    total_iters = cfg.total_iters()
    mcfg = cfg.model.build()
    gb, mb, seq = cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.data.seq_length
    n_micro = gb // (mb * dp_size)
    layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp_size}  # recorded in checkpoints
    log.info(f"world {world} = tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x dp {dp_size}; {'GPU' if cuda else 'CPU'}; "
             f"{total_iters} iterations of {gb} x {seq} tokens ({n_micro} micro-batches of {mb} per rank); "
             f"memory {'on' if mcfg.memory.enabled else 'off'}; {mcfg.num_parameters() / 1e6:.1f}M parameters")

    # ---- 2. model and optimizer
    model, optimizer, tconfig = (build_gpu if cuda else build_cpu)(cfg, mcfg)
    ckpt_models = [m.module if hasattr(m, "ddp_config") else m for m in model]  # what checkpoints see

    # ---- 3. data
    train_ds, valid_ds = build_datasets(cfg, total_iters, rank, torch.distributed.barrier)
    probes = {"probe_loss": build_probe(cfg, cfg.train.probe)} if cfg.train.probe else {}
    probes.update({f"{name}_loss": build_probe(cfg, path, f"train.probes.{name}")
                   for name, path in cfg.train.probes.items()})

    # ---- 4. resume, or initialise from a converted checkpoint
    save = cfg.checkpoint.save
    start_iter = 0
    latest = ckpt.latest_iteration(save) if cfg.checkpoint.resume else None
    if latest is not None:
        state = ckpt.load(save, latest, ckpt_models, optimizer, megatron_optimizer=cuda, rank=rank, layout=layout)
        start_iter = state["iteration"]
        log.info(f"resumed from {ckpt.iter_dir(save, latest)} (iteration {start_iter}, "
                 f"{state['consumed_samples']} samples consumed"
                 + ("" if state["rng_restored"] else f"; written at layout {state['layout']}, RNG not restored") + ")")
    elif cfg.checkpoint.init_from:
        report = ckpt.load_model_only(cfg.checkpoint.init_from, ckpt_models)
        if cuda:
            optimizer.reload_model_params()  # the fp32 main copies follow the loaded weights
        log.info(f"initialised from {cfg.checkpoint.init_from}; freshly initialised (not in the checkpoint): "
                 f"{report['fresh'] or 'none'}; checkpoint tensors not used: {report['ignored_from_checkpoint'] or 'none'}")
    if rank == 0 and save:
        os.makedirs(save, exist_ok=True)
        marker = os.path.join(save, REQUEUE_MARKER)
        if os.path.exists(marker):
            os.remove(marker)
    if start_iter >= total_iters:
        log.info(f"nothing to do: the checkpoint is at iteration {start_iter} of {total_iters}")
        log.close()
        destroy_parallel()
        return 0

    # ---- 5. the step functions (GPU: megatron schedules; CPU: plain loop)
    step = partial(gpu_step if cuda else cpu_step, model=model, optimizer=optimizer, tconfig=tconfig, cfg=cfg)
    dilated_mask = None
    if cfg.joint_dilated.enabled:
        jd = cfg.joint_dilated
        dilated_mask = dilated_attention_mask(seq, jd.chunk, jd.window, jd.prefix, device=device)

    def batches(dataset, it):
        from .data import micro_batches

        return micro_batches(dataset, it, gb, mb, dp_rank, dp_size, device)

    def evaluate(it):
        result = {}
        for name, dataset, mask in (("val_loss", valid_ds, None), ("val_loss_dilated", valid_ds, dilated_mask),
                                    *((n, ds, None) for n, ds in probes.items())):
            if dataset is None or (name == "val_loss_dilated" and mask is None):
                continue
            pair = torch.zeros(2, dtype=torch.float64, device=device)
            for k in range(cfg.train.eval_iters):
                pair += step(batches(dataset, k), lr=None, mask=mask)["pair"]
            result[name] = reduce_loss(pair)
        log.metrics(it, result, kind="eval")

    # ---- 6. signals: save and exit 0 so that Slurm can requeue the job
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)

    def save_checkpoint(it):
        if not save:
            return
        trainer_state = {"iteration": it, "consumed_samples": it * gb, "total_iters": total_iters,
                         "lr": learning_rate(max(it - 1, 0), **lr_args), "world_size": world, "layout": layout,
                         "config": cfg.to_dict()}
        t = time.time()
        path = ckpt.save(save, it, ckpt_models, optimizer, megatron_optimizer=cuda,
                         trainer_state=trainer_state, rank=rank,
                         optimizer_sharding=cfg.checkpoint.optimizer_sharding)
        interval.start += time.time() - t  # throughput counts training time only
        log.info(f"saved checkpoint {path} in {time.time() - t:.1f}s")

    # ---- 7. the loop
    o, s = cfg.optimizer, cfg.schedule
    lr_args = dict(lr=o.lr, min_lr=o.min_lr, total=total_iters, warmup=cfg.warmup_iters(), style=s.style,
                   wsd_decay_fraction=s.wsd_decay_fraction)
    passes = 2 if dilated_mask is not None else 1
    flops_per_iter = flops_per_token(mcfg, seq) * gb * seq * passes
    interval = Interval(device)
    it = start_iter
    saved_at = start_iter if latest is not None else None
    log.info(f"training from iteration {start_iter} to {total_iters}")
    while it < total_iters:
        lr = learning_rate(it, **lr_args)
        mbs = batches(train_ds, it)
        if dilated_mask is not None:  # RAT+ joint training: the dilated pass first, its own step
            out = step(mbs, lr=lr, mask=dilated_mask)
            interval.add("loss_dilated", out["pair"])
        out = step(mbs, lr=lr, mask=None)
        interval.add("loss", out["pair"])
        interval.add_scalar("grad_norm", out["grad_norm"])
        it += 1

        if it % cfg.train.log_interval == 0 or it == total_iters:
            stats = interval.flush()
            tokens_per_s = stats["iters"] * gb * seq / stats["seconds"]
            stats.update(lr=lr, tokens_per_s=tokens_per_s,
                         tflops_per_gpu=flops_per_iter * stats["iters"] / stats["seconds"] / world / 1e12,
                         memory_gib=memory_gib(device), consumed_samples=it * gb,
                         eta_s=(total_iters - it) * stats["seconds"] / stats["iters"])
            if mcfg.memory.enabled:
                stats.update(gate_stats(model, device))
            log.metrics(it, stats, kind="train", total=total_iters)
        if cfg.train.eval_interval and (it % cfg.train.eval_interval == 0 or it == total_iters):
            t = time.time()
            evaluate(it)
            interval.start += time.time() - t
        if save and cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
            save_checkpoint(it)
            saved_at = it

        # every rank must agree to stop (a signal may reach the ranks at different times)
        flag = torch.tensor([1.0 if stop["signal"] else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        exit_now = cfg.train.exit_at_iter is not None and it >= cfg.train.exit_at_iter
        if flag.item() > 0 or (exit_now and it < total_iters):
            if saved_at != it:
                save_checkpoint(it)
            why = stop["signal"] or "train.exit_at_iter"
            if rank == 0 and save and stop["signal"]:
                with open(os.path.join(save, REQUEUE_MARKER), "w") as f:
                    f.write(f"iteration {it} signal {why}\n")
            log.info(f"stopped at iteration {it} of {total_iters} ({why}); "
                     + (f"checkpoint saved; REQUEUE (marker {os.path.join(save, REQUEUE_MARKER)})"
                        if save and stop["signal"] else "checkpoint saved" if save else "no checkpoint dir: NOT saved"))
            log.close()
            destroy_parallel()
            return 0

    if save and saved_at != it:
        save_checkpoint(it)
    log.info(f"done: {total_iters} iterations, {total_iters * gb * seq / 1e6:.2f}M tokens")
    log.close()
    destroy_parallel()
    return 0


# ------------------------------------------------------------------------------------------ CPU

def build_cpu(cfg: TrainConfig, mcfg):
    """The megatron model (TP through megatron's layers, gloo) and torch's AdamW."""
    import torch

    from ..model import HAVE_TE, build_model, to_transformer_config

    use_te = HAVE_TE if cfg.model.use_te is None else cfg.model.use_te
    tconfig = to_transformer_config(mcfg, cfg.precision, tp=cfg.parallel.tp, pp=1)
    model = build_model(mcfg, tconfig, use_te=use_te)
    if cfg.joint_dilated.enabled and use_te:
        raise TrainConfigError("joint_dilated needs the local SDPA attention; set model.use_te=false")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms and biases
    o = cfg.optimizer
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
    return [model], optimizer, tconfig


def cpu_step(mbs, *, lr, mask, model, optimizer, tconfig, cfg):
    """One optimizer step (lr given) or one forward-only pass (lr None) over this rank's micro-batches."""
    import torch
    from megatron.core import parallel_state as ps

    from ..model.attention import explicit_attention_mask
    from ..parallel import sum_tp_replicated_grads

    (m,) = model
    train = lr is not None
    m.train(train)
    pair = torch.zeros(2, dtype=torch.float64)
    ctx = explicit_attention_mask() if mask is not None else nullcontext()
    with ctx, (nullcontext() if train else torch.no_grad()):
        if train:
            optimizer.zero_grad(set_to_none=True)
        for b in mbs:
            per_token = m(b["tokens"], b["position_ids"], mask, labels=b["labels"])  # [b, s]
            lm = b["loss_mask"].float()
            loss_sum, n = (per_token.float() * lm).sum(), lm.sum()
            if train:
                (loss_sum / n.clamp(min=1) / len(mbs)).backward()
            pair += torch.stack([loss_sum.detach().double(), n.double()])
    if not train:
        return {"pair": pair}
    sum_tp_replicated_grads(m, tconfig)  # what megatron's finalize_model_grads does on GPU
    params = [p for p in m.parameters() if p.grad is not None]
    dp = ps.get_data_parallel_world_size()
    if dp > 1:  # data parallel: average the gradients, one flat all-reduce
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=ps.get_data_parallel_group())
        flat /= dp
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
    grad_norm = tp_aware_grad_norm(params)
    if cfg.optimizer.clip_grad > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.optimizer.clip_grad, grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return {"pair": pair, "grad_norm": grad_norm}


def tp_aware_grad_norm(params):
    """Global L2 norm of the gradients: TP-sharded tensors summed over the TP group, replicated ones once."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.detach().double().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    return sq.sqrt()


# ------------------------------------------------------------------------------------------ GPU

def build_gpu(cfg: TrainConfig, mcfg):
    """megatron model chunk (this rank's PP stage), bf16 wrapper, DDP and the distributed optimizer."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from ..model import HAVE_TE, build_model, to_transformer_config

    use_te = HAVE_TE if cfg.model.use_te is None else cfg.model.use_te
    if cfg.joint_dilated.enabled and use_te:
        raise TrainConfigError("joint_dilated needs the local SDPA attention (TE's causal kernels ignore "
                         "the dilated mask); set model.use_te=false")
    tconfig = to_transformer_config(mcfg, cfg.precision, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                                    sequence_parallel=cfg.parallel.sequence_parallel)
    model = build_model(mcfg, tconfig, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage(), use_te=use_te)
    model.cuda(torch.cuda.current_device())
    if cfg.precision.bf16:
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True)
    model = DistributedDataParallel(tconfig, ddp_config, model)
    o = cfg.optimizer
    opt_config = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
                                 bf16=cfg.precision.bf16, params_dtype=tconfig.params_dtype,
                                 use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(opt_config, [model])
    # hooks the schedules call: no grad sync between micro-batches, reduce + finalize after the last
    tconfig.no_sync_func = model.no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    return [model], optimizer, tconfig


def _loss_func(loss_mask, output):
    """megatron's 3-tuple loss contract: (sum, tokens, report); the schedule divides by tokens and micro-batches."""
    import torch

    lm = loss_mask.view(-1).float()
    loss_sum = (output.float().view(-1) * lm).sum()
    n = lm.sum().to(torch.int)
    return loss_sum, n, {"lm loss": torch.stack([loss_sum.detach().double(), n.double()])}


def gpu_step(mbs, *, lr, mask, model, optimizer, tconfig, cfg):
    """One optimizer step (lr given) or one forward-only pass (lr None) through megatron's schedules."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..model.attention import explicit_attention_mask

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(b["tokens"], b["position_ids"], mask, labels=b["labels"])
        return out, partial(_loss_func, b["loss_mask"])

    train = lr is not None
    for chunk in model:
        chunk.train(train)
    if train:
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    ctx = explicit_attention_mask() if mask is not None else nullcontext()
    with ctx, (nullcontext() if train else torch.no_grad()):
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=model, num_microbatches=len(mbs),
            seq_length=cfg.data.seq_length, micro_batch_size=cfg.batch.micro_batch_size, forward_only=not train)
    pair = torch.zeros(2, dtype=torch.float64, device="cuda")
    for r in reports:  # non-empty on the last pipeline stage only
        pair += r["lm loss"]
    if not train:
        return {"pair": pair}
    for group in optimizer.param_groups:
        group["lr"] = lr
    ok, grad_norm, _ = optimizer.step()  # grad clipping inside (OptimizerConfig.clip_grad)
    return {"pair": pair, "grad_norm": torch.tensor(float(grad_norm if grad_norm is not None else float("nan")))}


# ------------------------------------------------------------------------------------------ logging

def reduce_loss(pair) -> float:
    """Mean loss from a local [sum, tokens] pair summed over all ranks (TP copies cancel in the ratio)."""
    import torch

    pair = pair.clone()
    torch.distributed.all_reduce(pair)
    return (pair[0] / pair[1].clamp(min=1)).item()


def gate_stats(model, device) -> dict:
    """The memory gate, to watch whether it opens: mean bias, mean sigmoid(bias), weight RMS.

    g = sigmoid(W_g x + b): the identity start has W_g = 0 and b = -6, so the bias and the weight
    RMS show how far the gate has moved. W_g is the gate rows of each layer's fused linear_qkv, b its
    `memory_gate_bias`. Summed over this rank's layers, then over the TP x PP group (gate shards and
    pipeline stages differ; data-parallel replicas are identical).
    """
    import torch
    from megatron.core import parallel_state as ps

    from ..model.attention import RATPlusSelfAttention
    from ..qkv_layout import GATE, split_groups

    bias_sum = open_sum = n_bias = weight_sq = n_weight = 0.0  # at log intervals only: .item() is fine
    for chunk in model:
        for module in chunk.modules():
            if not isinstance(module, RATPlusSelfAttention):
                continue
            weight = module.linear_qkv.weight.detach()
            if type(weight) is not torch.Tensor:  # e.g. TE's FP8 primary weights
                weight = weight.dequantize()
            w = split_groups(weight, module.qkv_parts)[GATE].double()
            weight_sq, n_weight = weight_sq + w.square().sum().item(), n_weight + w.numel()
            if module.memory_gate_bias is not None:
                b = module.memory_gate_bias.detach().double()
                bias_sum, open_sum, n_bias = bias_sum + b.sum().item(), open_sum + b.sigmoid().sum().item(), n_bias + b.numel()
    acc = torch.tensor([bias_sum, open_sum, n_bias, weight_sq, n_weight], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and ps.get_model_parallel_group().size() > 1:
        torch.distributed.all_reduce(acc, group=ps.get_model_parallel_group())
    out = {}
    if acc[2] > 0:
        out.update(gate_bias_mean=(acc[0] / acc[2]).item(), gate_open_mean=(acc[1] / acc[2]).item())
    if acc[4] > 0:
        out["gate_weight_rms"] = (acc[3] / acc[4]).sqrt().item()
    return out


def memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Interval:
    """Sums over the iterations since the last log line."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.start, self.iters, self.pairs, self.scalars = time.time(), 0, {}, {}

    def add(self, name, pair):
        self.pairs[name] = self.pairs.get(name, 0) + pair
        if name == "loss":
            self.iters += 1

    def add_scalar(self, name, value):
        self.scalars.setdefault(name, []).append(value)

    def flush(self) -> dict:
        out = {name: reduce_loss(pair) for name, pair in self.pairs.items()}
        for name, values in self.scalars.items():
            out[name] = float(sum(float(v) for v in values) / len(values))
        out["iters"] = self.iters
        out["seconds"] = max(time.time() - self.start, 1e-9)
        self.reset()
        return out


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Logger:
    """stdout (rank 0), a JSON-lines metrics file, and W&B (rank 0; online, offline or disabled)."""

    def __init__(self, cfg: TrainConfig, rank: int):
        self.rank, self.t0, self.wandb = rank, time.time(), None
        self.metrics_path = cfg.train.metrics_file or (
            os.path.join(cfg.checkpoint.save, "metrics.jsonl") if cfg.checkpoint.save else None)
        if rank != 0:
            return
        if self.metrics_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_path)), exist_ok=True)
        if cfg.wandb.mode != "disabled":
            self.wandb = _init_wandb(cfg)

    def info(self, msg: str):
        if self.rank == 0:
            print(f"[train {_hms(time.time() - self.t0)}] {msg}", flush=True)

    def metrics(self, it: int, stats: dict, kind: str, total: int | None = None):
        if self.rank != 0:
            return
        if kind == "train":
            parts = [f"iter {it}/{total} ({100 * it / total:.1f}%)", f"loss {stats['loss']:.4f}"]
            if "loss_dilated" in stats:
                parts.append(f"loss_dilated {stats['loss_dilated']:.4f}")
            parts += [f"lr {stats['lr']:.3e}", f"grad_norm {stats['grad_norm']:.3f}",
                      f"tokens/s {stats['tokens_per_s']:.0f}", f"TFLOP/s/GPU {stats['tflops_per_gpu']:.2f}",
                      f"mem {stats['memory_gib']:.2f}GiB", f"ETA {_hms(stats['eta_s'])}"]
        else:
            parts = [f"iter {it}"] + [f"{k} {v:.4f}" for k, v in stats.items()]
        self.info(" | ".join(parts))
        record = {"iteration": it, "kind": kind, **stats}
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            prefix = "train/" if kind == "train" else "val/"
            self.wandb.log({prefix + k: v for k, v in stats.items()}, step=it)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _init_wandb(cfg: TrainConfig):
    """wandb.init with a run id kept in SAVE, so a resumed (requeued) job continues the same run."""
    try:
        import wandb
    except ImportError:
        raise TrainConfigError(f"wandb.mode={cfg.wandb.mode} needs the wandb package (pip install wandb); "
                               "or set wandb.mode=disabled") from None

    w, save = cfg.wandb, cfg.checkpoint.save
    run_dir = w.dir or save or "wandb_runs"
    os.makedirs(run_dir, exist_ok=True)
    run_id = None
    if save:
        id_file = os.path.join(save, "wandb_id.txt")
        if os.path.isfile(id_file):
            run_id = open(id_file).read().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
    return wandb.init(project=w.project, name=w.name, entity=w.entity, mode=w.mode, dir=run_dir,
                      config=cfg.to_dict(), id=run_id, resume="allow" if run_id else None)
