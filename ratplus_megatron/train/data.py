"""Batches from megatron's GPTDataset in a fixed order: sample k of the run is always the same.

Iteration ``it`` uses global samples [it * G, (it + 1) * G) (G = global batch); data-parallel
rank r takes its contiguous G / dp slice, cut into micro-batches. So the data position is just
the number of consumed samples, and a resumed run reads exactly what an uninterrupted one would.
"""
from __future__ import annotations

import os

import torch

from .config import TrainConfigError
from ..data.megatron_data import MegatronTokenizerAdapter, build_gpt_datasets


def build_datasets(cfg, total_iters: int, rank: int, barrier):
    """(train, valid) GPTDatasets; rank 0 builds the index caches first, then the others read them."""
    d, gb = cfg.data, cfg.batch.global_batch_size
    tokenizer = MegatronTokenizerAdapter.from_pretrained(d.tokenizer)
    model_vocab = cfg.model.build().vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise TrainConfigError(f"tokenizer {d.tokenizer} has {tokenizer.vocab_size} ids but the model's vocab_size "
                         f"is {model_vocab}")
    n_valid = gb * cfg.train.eval_iters if cfg.train.eval_interval else None  # None: one epoch, unused
    if d.sft:  # prompt/answer pairs (data_prep/tokenize.py --sft): small .npy files, no index cache
        from ..data.sft import SFTError, build_sft_datasets

        try:
            return build_sft_datasets(d.prefixes, d.seq_length, d.split, total_iters * gb, n_valid, cfg.train.seed)
        except SFTError as e:
            raise TrainConfigError(str(e)) from None
    if n_valid:
        _check_validation_split(d.prefixes, d.split)
    n_test, split = None, d.split
    if d.weights is not None:
        # megatron needs explicit sizes for every split of a weighted blend; the unused ones get one batch,
        # and without validation they get no documents (an empty split would make megatron loop forever)
        if not n_valid:
            split = "1,0,0"
        n_valid, n_test = n_valid or gb, gb
    cache = d.cache_dir or (os.path.join(cfg.checkpoint.save, "data_cache") if cfg.checkpoint.save else None)
    kwargs = dict(seq_length=d.seq_length, num_samples=(total_iters * gb, n_valid, n_test),
                  split=split, weights=d.weights, seed=cfg.train.seed, path_to_cache=cache,
                  create_attention_mask=False)
    built = None
    if rank == 0:
        built = build_gpt_datasets(d.prefixes, tokenizer, **kwargs)
    barrier()
    if rank != 0:
        built = build_gpt_datasets(d.prefixes, tokenizer, **kwargs)
    train, valid, _ = built
    if cfg.train.eval_interval and valid is None:
        raise TrainConfigError(f"train.eval_interval is set but data.split={d.split!r} has no validation part")
    return train, valid


def build_probe(cfg, prefix: str, key: str = "train.probe"):
    """An SFT probe set (train.probe or one of train.probes): eval_iters global batches of
    prompt/answer sequences (answer-only loss)."""
    from ..data.sft import SFTDataset, SFTError

    try:
        return SFTDataset([prefix], cfg.data.seq_length, "100,0,0", "train",
                          cfg.batch.global_batch_size * cfg.train.eval_iters, cfg.train.seed)
    except (SFTError, OSError) as e:
        raise TrainConfigError(f"{key}: {e}") from None


def _check_validation_split(prefixes, split: str) -> None:
    """Fail clearly when a prefix's validation split has no document (megatron would loop forever)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    weights = [float(w) for w in split.replace("/", ",").split(",")] + [0.0, 0.0]
    total = sum(weights[:3])
    if total <= 0 or weights[1] <= 0:
        raise TrainConfigError(f"train.eval_interval is set but data.split={split!r} has no validation part")
    lo, hi = weights[0] / total, (weights[0] + weights[1]) / total
    for prefix in prefixes:
        n = IndexedDataset(prefix).document_indices.shape[0] - 1
        if int(round(hi * n)) - int(round(lo * n)) <= 0:
            raise TrainConfigError(f"the validation split ({split!r}) of {prefix} gets no document out of {n}: "
                             "use more documents, a larger validation weight, or train.eval_interval=0")


def micro_batches(dataset, it: int, global_batch: int, micro: int, dp_rank: int, dp_size: int, device):
    """The micro-batches (dicts of [micro, seq] tensors) of data-parallel rank ``dp_rank`` at iteration ``it``."""
    per_rank = global_batch // dp_size
    start = it * global_batch + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro):
        first = start + m * micro
        samples = [dataset[(first + j) % len(dataset)] for j in range(micro)]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device, non_blocking=True)
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        out.append(batch)
    return out


def dilated_attention_mask(seq_length: int, chunk: int, window: int, prefix: int, device=None) -> torch.Tensor:
    """RAT+'s dilated mask in megatron's convention ([1, 1, s, s], True = masked out).

    Query i sees key j <= i when i - j <= window, or j < prefix, or j ends a chunk ((j + 1) % chunk == 0).
    """
    i = torch.arange(seq_length, device=device)[:, None]
    j = torch.arange(seq_length, device=device)[None, :]
    visible = (j <= i) & (((i - j) <= window) | (j < prefix) | ((j + 1) % chunk == 0))
    return (~visible)[None, None]
