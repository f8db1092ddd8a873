"""Supervised fine-tuning data: prompt/answer pairs -> fixed-length sequences with an answer-only loss mask.

    python data_prep/tokenize.py --sft --input RULER_TRAIN_JSONL --tokenizer TOK \
        --seq-length 4096 --output-prefix OUT/sft            (same as python -m ratplus_megatron.data.sft ...)

reads RULER-format jsonl (what ``python -m eval.ruler.generate --split train`` writes: a file, a
folder searched recursively, or a quoted glob): the prompt is ``input + answer_prefix`` tokenized
exactly as ``eval/niah.py`` feeds it at inference (``add_special_tokens=True``), the answer is
``target`` (RULER train split: ``" " + ", ".join(outputs)``, RAT+'s comma-joined answers) or, when
absent, built from ``outputs`` the same way, tokenized without special tokens, then the
tokenizer's EOS. Each pair becomes one sequence of ``seq_length + 1`` ids (padded with the pad id,
or EOS when the tokenizer has none); pairs that do not fit are dropped and counted. Rows are
written in a seeded shuffled order, so a contiguous validation split mixes the tasks.

Files (written to temporaries, then renamed; nothing half-written on an error):

    OUT/sft_sft.tokens.npy   [N, seq_length + 1] uint16 (vocab <= 65536) or int32
    OUT/sft_sft.spans.npy    [N, 2] int64: (prompt tokens, prompt + answer + EOS tokens)
    OUT/sft_sft.json         summary (pairs, dropped, tokenizer, seq_length, answer-token stats)

The trainer reads them with ``data.sft=true data.prefixes=[OUT/sft_sft]``: the loss mask is 1
exactly on the positions whose label is an answer token or the EOS after it (prompt and padding
are masked), so the loss is the mean cross-entropy over answer tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Optional, Sequence

import numpy as np

SFT_SUFFIX = "_sft"
TOKENS_EXT = ".tokens.npy"
SPANS_EXT = ".spans.npy"

__all__ = ["SFTError", "NothingFitsError", "SFT_SUFFIX", "sft_files", "encode_pair", "build_sft_dataset", "SFTDataset",
           "loss_mask_for", "main"]


class SFTError(Exception):
    """A user-facing error: one line."""


class NothingFitsError(SFTError):
    """No pair is short enough for the sequence length (callers may skip such a set)."""


def sft_files(prefix: str) -> tuple[str, str, str]:
    """(tokens .npy, spans .npy, summary .json) of a data path such as OUT/sft_sft."""
    return prefix + TOKENS_EXT, prefix + SPANS_EXT, prefix + ".json"


def answer_text(row: dict) -> str:
    if "target" in row and row["target"] is not None:
        return str(row["target"])
    outs = row.get("outputs")
    if not isinstance(outs, list) or not outs:
        raise KeyError("outputs")
    return " " + ", ".join(str(o) for o in outs)


def encode_pair(tokenizer, prompt: str, answer: str, eos_id: int) -> tuple[list[int], list[int]]:
    """(prompt ids as inference sees them, answer ids + EOS)."""
    p = tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"]
    return list(p), list(a) + [int(eos_id)]


def loss_mask_for(prompt_len: int, total_len: int, seq_length: int) -> np.ndarray:
    """Mask over the seq_length label positions: label p is token p + 1; 1 for answer tokens and EOS."""
    m = np.zeros(seq_length, dtype=np.float32)
    m[max(prompt_len - 1, 0): max(total_len - 1, 0)] = 1.0
    return m


def _iter_rows(files: Sequence[str]) -> Iterable[tuple[str, int, dict]]:
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise SFTError(f"{f}:{n}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise SFTError(f"{f}:{n}: expected a JSON object per line")
                yield f, n, row


def _resolve(src: str) -> list[str]:
    from .tokenize_corpus import TokenizeError, resolve_local_input

    try:
        local = resolve_local_input(src)
    except TokenizeError as e:
        raise SFTError(str(e)) from None
    if local is None:
        raise SFTError(f"--input {src}: not found (SFT input is local RULER-format jsonl: a file, folder or glob)")
    builder, files = local
    if builder != "json":
        raise SFTError(f"--input {src}: SFT input must be .jsonl files (RULER format), got {builder}")
    return files


def build_sft_dataset(src: str, tokenizer_spec: str, output_prefix: str, seq_length: int, seed: int = 1234,
                      max_pairs: Optional[int] = None) -> dict:
    """Tokenize RULER-format jsonl into OUTPUT_PREFIX_sft.{tokens,spans}.npy + .json; returns the summary."""
    if seq_length < 2:
        raise SFTError(f"--seq-length must be >= 2, got {seq_length}")
    files = _resolve(src)
    from .tokenize_corpus import _load_tokenizer, choose_dtype, TokenizeError

    try:
        tok = _load_tokenizer(tokenizer_spec)
    except TokenizeError as e:
        raise SFTError(str(e)) from None
    eos = tok.eos_token_id
    if eos is None:
        raise SFTError(f"--tokenizer {tokenizer_spec}: has no EOS token (needed to end the answers)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    dtype = choose_dtype(len(tok))
    rows, spans, dropped = [], [], 0
    answer_tokens = []
    for f, n, row in _iter_rows(files):
        if not isinstance(row.get("input"), str):
            raise SFTError(f"{f}:{n}: no 'input' text field (expected RULER jsonl: input, answer_prefix, outputs)")
        try:
            ans = answer_text(row)
        except KeyError:
            raise SFTError(f"{f}:{n}: no 'target' and no non-empty 'outputs' list: nothing to learn") from None
        p, a = encode_pair(tok, row["input"] + str(row.get("answer_prefix") or ""), ans, eos)
        total = len(p) + len(a)
        if total > seq_length + 1:
            dropped += 1
            continue
        seq = np.full(seq_length + 1, pad, dtype=np.int64)
        seq[: len(p)] = p
        seq[len(p): total] = a
        rows.append(seq)
        spans.append((len(p), total))
        answer_tokens.append(len(a))
        if max_pairs and len(rows) >= max_pairs:
            break
    if not rows:
        raise NothingFitsError(f"--input {src}: no pair fits --seq-length {seq_length} ({dropped} dropped as too long)")
    order = np.random.default_rng(seed).permutation(len(rows))
    tokens = np.stack(rows)[order].astype(dtype)
    spans_arr = np.asarray(spans, dtype=np.int64)[order]
    summary = {"output_prefix": output_prefix + SFT_SUFFIX, "pairs": int(len(rows)), "dropped_too_long": dropped,
               "seq_length": seq_length, "dtype": dtype, "tokenizer": tokenizer_spec, "vocab_size": len(tok),
               "eos_token_id": int(eos), "pad_token_id": int(pad), "input": src, "files": len(files), "seed": seed,
               "answer_tokens_mean": float(np.mean(answer_tokens)), "answer_tokens_max": int(np.max(answer_tokens)),
               "prompt_tokens_max": int(spans_arr[:, 0].max())}
    _write_atomic(output_prefix + SFT_SUFFIX, tokens, spans_arr, summary)
    return summary


def _write_atomic(prefix: str, tokens: np.ndarray, spans: np.ndarray, summary: dict) -> None:
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    finals = sft_files(prefix)
    tag = f".tmp-{os.getpid()}"
    tmps = [f + tag for f in finals]
    try:
        for arr, tmp in ((tokens, tmps[0]), (spans, tmps[1])):
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
        with open(tmps[2], "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
            fh.write("\n")
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
    except BaseException:
        for tmp in tmps:
            try:
                os.remove(tmp)
            except OSError:
                pass
        raise


# ------------------------------------------------------------------------------------------ trainer side

def _split_range(n: int, split: str, which: str) -> tuple[int, int]:
    weights = [float(w) for w in split.replace("/", ",").split(",")] + [0.0, 0.0]
    total = sum(weights[:3])
    bounds = [0]
    for w in weights[:3]:
        bounds.append(bounds[-1] + w / total)
    k = {"train": 0, "valid": 1, "test": 2}[which]
    return int(round(bounds[k] * n)), int(round(bounds[k + 1] * n))


class SFTDataset:
    """SFT sequences in a seeded order: sample i is epoch i // n, row perm_epoch[i % n].

    Items are dicts of tokens / labels / loss_mask / position_ids like megatron's GPTDataset, so the
    trainer's batching (and resume by consumed samples) is unchanged.
    """

    def __init__(self, prefixes: Sequence[str], seq_length: int, split: str = "100,0,0", which: str = "train",
                 num_samples: Optional[int] = None, seed: int = 1234):
        self.seq_length = seq_length
        self.parts = []  # (tokens, spans, rows in this split)
        for prefix in prefixes:
            tok_file, span_file, _ = sft_files(prefix)
            tokens = np.load(tok_file, mmap_mode="r")
            spans = np.load(span_file)
            if tokens.ndim != 2 or tokens.shape[1] != seq_length + 1:
                raise SFTError(f"SFT data {prefix}: sequences of {tokens.shape[-1] - 1} tokens, but data.seq_length="
                               f"{seq_length} (rerun the --sft tokenization with --seq-length {seq_length})")
            lo, hi = _split_range(len(tokens), split, which)
            self.parts.append((tokens, spans, np.arange(lo, hi)))
        self.index = [(p, r) for p, (_, _, rows) in enumerate(self.parts) for r in rows]
        self.n = len(self.index)
        self.num_samples = self.n if num_samples is None else int(num_samples)
        self.seed = seed
        self._perms = {}

    def __len__(self):
        return self.num_samples

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __getitem__(self, i: int) -> dict:
        import torch

        if self.n == 0:
            raise IndexError("empty SFT split")
        epoch, j = divmod(int(i), self.n)
        p, r = self.index[int(self._perm(epoch)[j])]
        tokens, spans, _ = self.parts[p]
        row = np.asarray(tokens[r], dtype=np.int64)
        prompt_len, total = (int(x) for x in spans[r])
        S = self.seq_length
        return {"tokens": torch.from_numpy(row[:S].copy()), "labels": torch.from_numpy(row[1: S + 1].copy()),
                "loss_mask": torch.from_numpy(loss_mask_for(prompt_len, total, S)),
                "position_ids": torch.arange(S, dtype=torch.int64)}


def build_sft_datasets(prefixes, seq_length: int, split: str, num_train: int, num_valid: Optional[int], seed: int):
    train = SFTDataset(prefixes, seq_length, split, "train", num_train, seed)
    if train.n == 0:
        raise SFTError(f"SFT data {', '.join(prefixes)}: the train split ({split!r}) holds no sequence")
    valid = None
    if num_valid:
        valid = SFTDataset(prefixes, seq_length, split, "valid", num_valid, seed)
        if valid.n == 0:
            raise SFTError(f"SFT data: the validation split ({split!r}) holds no sequence; "
                           "use more pairs, a larger validation weight, or train.eval_interval=0")
    return train, valid


# ------------------------------------------------------------------------------------------ command line

def build_parser(prog=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m ratplus_megatron.data.sft",
                                description="RULER-format prompt/answer jsonl -> SFT sequences with an answer-only "
                                            "loss mask (OUTPUT_PREFIX_sft.tokens.npy/.spans.npy/.json).")
    p.add_argument("--input", required=True, help="RULER jsonl (eval.ruler.generate --split train): file, folder or glob")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id (the model's)")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_sft.*; the data path is OUTPUT_PREFIX_sft")
    p.add_argument("--seq-length", type=int, required=True, help="training sequence length (data.seq_length)")
    p.add_argument("--seed", type=int, default=1234, help="row order (default 1234)")
    p.add_argument("--max-pairs", type=int, default=None)
    return p


def run_cli(args) -> int:
    try:
        s = build_sft_dataset(args.input, args.tokenizer, args.output_prefix, args.seq_length, args.seed,
                              args.max_pairs)
    except (SFTError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"done: {s['pairs']} pairs ({s['dropped_too_long']} dropped as too long), answers "
          f"{s['answer_tokens_mean']:.1f} tokens on average (max {s['answer_tokens_max']}); "
          f"use data path {s['output_prefix']} with data.sft=true data.seq_length={s['seq_length']}", flush=True)
    return 0


def main(argv=None, prog=None) -> int:
    return run_cli(build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
