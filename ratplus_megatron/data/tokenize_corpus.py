"""Text corpus -> token ids -> one megatron-core indexed dataset (PREFIX_text_document.{bin,idx}).

This is the logic behind ``python data_prep/tokenize.py`` (a thin entry point that only fixes
``sys.path``: that file name shadows the standard ``tokenize`` module). Run it as

    python data_prep/tokenize.py --input SRC --tokenizer TOK --output-prefix PREFIX [options]
    python -m ratplus_megatron.data.tokenize_corpus --input SRC ...          (same thing)

SRC is anything Hugging Face ``datasets`` reads: a hub id (with --config/--split, --streaming for
hub-scale data) or local json/jsonl/parquet/txt/csv files (optionally .gz/.zst/.bz2/.xz), a
folder of them, or a glob. TOK is a tokenizer folder or hub id (AutoTokenizer).

Design points:
- Each document becomes one megatron "document" of one sequence: its token ids followed by the
  tokenizer's EOS (--no-append-eos turns that off). Documents that tokenize to nothing are skipped.
- Token dtype: uint16 when every id of the tokenizer fits (vocabulary <= 65536), else int32, as
  megatron's GPTDatasetConfig assumes; --dtype forces one (and fails if the vocabulary does not fit).
- Worker processes (fork) tokenize batches; results come back in input order, with a bounded
  number of batches in flight, so the output is byte-for-byte deterministic and memory stays flat
  even on a streamed hub dataset.
- --max-tokens N stops at the first document boundary at or past N tokens (so a training budget
  of N tokens is covered); --max-documents N stops after N documents.
- Nothing half-written: the .bin/.idx/.json are written to temporary files in the output folder
  and renamed at the end; on any error or interrupt the temporaries are removed.
- User errors (bad flag, missing file, missing text column, empty input, vocabulary too large for
  the dtype, unreadable input or tokenizer) print ONE line ``error: ...`` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "TokenizeError",
    "EXIT_USER_ERROR",
    "DOCUMENT_SUFFIX",
    "build_parser",
    "parse_args",
    "resolve_local_input",
    "choose_dtype",
    "tokenize_corpus",
    "main",
]

EXIT_USER_ERROR = 2
DOCUMENT_SUFFIX = "_text_document"
UINT16_VOCAB_LIMIT = 1 << 16  # ids 0..65535

# file suffix -> datasets builder name
_BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet",
             ".txt": "text", ".text": "text", ".csv": "csv"}
_COMPRESSION = (".gz", ".zst", ".bz2", ".xz")
_GLOB_CHARS = set("*?[")


class TokenizeError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """First non-empty line of an exception message, prefixed by its type, clipped."""
    text = str(exc).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a single line (exit code 2)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def _positive_int(name: str):
    def parse(value: str) -> int:
        try:
            v = int(value.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {value!r}")
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value!r}")
        return v
    return parse


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=prog,
        description="Tokenize a text corpus into a megatron-core indexed dataset "
                    "PREFIX_text_document.{bin,idx} (+ a .json summary).",
    )
    p.add_argument("--input", required=True, metavar="SRC",
                   help="HF hub dataset id, or local json/jsonl/parquet/txt/csv file(s): a file, "
                        "a folder or a glob (quote it)")
    p.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="tokenizer folder or HF hub id (transformers.AutoTokenizer)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX_text_document.bin/.idx/.json; the folder is created")
    p.add_argument("--text-key", default="text", help="column holding the text (default: text)")
    p.add_argument("--split", default="train", help="dataset split for hub datasets (default: train)")
    p.add_argument("--config", default=None, metavar="NAME", help="dataset configuration (subset) name")
    p.add_argument("--streaming", action="store_true",
                   help="stream the dataset instead of materialising it in the datasets cache")
    p.add_argument("--workers", type=_positive_int("--workers"), default=_default_workers(),
                   help="tokenizer processes (default: CPUs available, at most 16)")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=512,
                   help="documents per worker task (default: 512)")
    p.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=None,
                   help="stop at the first document boundary at or past this many tokens")
    p.add_argument("--max-documents", type=_positive_int("--max-documents"), default=None,
                   help="stop after this many documents")
    p.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="append the tokenizer's EOS to every document (default: on)")
    p.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto",
                   help="token dtype on disk (default auto: uint16 if the vocabulary fits, else int32)")
    p.add_argument("--txt-sample-by", choices=("line", "paragraph", "document"), default="line",
                   help="for .txt input: one document per line (default), paragraph or file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("SFT (prompt/answer pairs; see ratplus_megatron/data/sft.py)")
    g.add_argument("--sft", action="store_true",
                   help="SRC is RULER-format jsonl (input, answer_prefix, target/outputs): write fixed-length "
                        "sequences with an answer-only loss mask to PREFIX_sft.{tokens,spans}.npy (+ .json)")
    g.add_argument("--seq-length", type=_positive_int("--seq-length"), default=None,
                   help="with --sft: the training sequence length (required)")
    g.add_argument("--seed", type=int, default=1234, help="with --sft: row order seed (default 1234)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    for flag in ("input", "tokenizer", "output_prefix", "text_key", "split"):
        if not str(getattr(args, flag)).strip():
            p.error(f"--{flag.replace('_', '-')} must not be empty")
    return args


# --------------------------------------------------------------------------------------------
# input resolution (no heavy imports)
# --------------------------------------------------------------------------------------------

def _builder_for(path: str) -> Optional[str]:
    lower = path.lower()
    for comp in _COMPRESSION:
        if lower.endswith(comp):
            lower = lower[: -len(comp)]
            break
    return _BUILDERS.get(os.path.splitext(lower)[1])


def _looks_like_path(src: str) -> bool:
    if src.startswith(("/", "./", "../", "~")) or os.path.isabs(src):
        return True
    if _builder_for(src) is not None:
        return True
    # a hub id is "name" or "owner/name"; anything deeper is a path
    return src.count("/") >= 2


def resolve_local_input(src: str) -> Optional[Tuple[str, List[str]]]:
    """Return (datasets builder, sorted files) for a local SRC, None for a hub id.

    Raises TokenizeError for a local-looking SRC that does not exist, matches nothing, has an
    unsupported or mixed file type, or only empty files.
    """
    expanded = os.path.expanduser(src)
    if any(c in _GLOB_CHARS for c in expanded):
        files = sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
        if not files:
            raise TokenizeError(f"--input {src}: no files match this pattern")
    elif os.path.isdir(expanded):
        files = []
        for root, dirs, names in os.walk(expanded):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(os.path.join(root, n) for n in sorted(names)
                         if not n.startswith(".") and _builder_for(n) is not None)
        if not files:
            raise TokenizeError(f"--input {src}: folder holds no .jsonl/.json/.parquet/.txt/.csv files")
    elif os.path.isfile(expanded):
        files = [expanded]
    elif os.path.lexists(expanded):
        raise TokenizeError(f"--input {src}: not a regular file (broken link?)")
    elif _looks_like_path(src):
        raise TokenizeError(f"--input {src}: file not found")
    else:
        return None

    builders = {}
    for f in files:
        b = _builder_for(f)
        if b is None:
            raise TokenizeError(f"--input {f}: unsupported file type (expected .jsonl, .json, "
                                f".parquet, .txt or .csv, optionally .gz/.zst/.bz2/.xz)")
        builders.setdefault(b, f)
    if len(builders) > 1:
        kinds = ", ".join(f"{b} ({f})" for b, f in builders.items())
        raise TokenizeError(f"--input {src}: mixes file types {kinds}; tokenize each type separately")
    for f in files:
        if not os.access(f, os.R_OK):
            raise TokenizeError(f"--input {f}: file is not readable (permission denied)")
    if all(_is_blank(f) for f in files):
        what = files[0] if len(files) == 1 else f"{src} ({len(files)} files)"
        raise TokenizeError(f"--input {what}: input is empty (no data, only whitespace or 0 bytes)")
    return next(iter(builders)), files


def _is_blank(path: str, chunk: int = 1 << 16) -> bool:
    """True when an uncompressed text file holds only whitespace (stops at the first other byte)."""
    if os.path.getsize(path) == 0:
        return True
    if path.lower().endswith(_COMPRESSION) or _builder_for(path) == "parquet":
        return False
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    return True
                if block.strip():
                    return False
    except OSError as exc:
        raise TokenizeError(f"--input {path}: cannot read file: {exc.strerror or exc}")


# --------------------------------------------------------------------------------------------
# dataset loading
# --------------------------------------------------------------------------------------------

def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("torch.utils.cpp_extension", "megatron", "datasets", "transformers", "fsspec",
                 "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _load_dataset(args: argparse.Namespace, local: Optional[Tuple[str, List[str]]]):
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if local is not None:
            builder, files = local
            kwargs: Dict[str, Any] = {}
            if builder == "text":
                kwargs["sample_by"] = args.txt_sample_by
            return datasets.load_dataset(builder, data_files=files, split="train",
                                         streaming=args.streaming, **kwargs)
        return datasets.load_dataset(args.input, name=args.config, split=args.split,
                                     streaming=args.streaming)
    except TokenizeError:
        raise
    except Exception as exc:  # datasets raises many types; all mean "cannot read this input"
        where = "local input" if local is not None else "dataset"
        raise TokenizeError(f"--input {args.input}: cannot read {where}: {_one_line(exc)}")


def _check_columns(ds, args: argparse.Namespace) -> Tuple[Any, Optional[int]]:
    """Verify the text column exists and the input is not empty.

    Returns (dataset-like object, number of rows or None when streaming)."""
    columns = getattr(ds, "column_names", None)
    first = None
    if columns is None:  # a streamed dataset without declared features: look at the first row
        try:
            it = iter(ds)
            first = next(it, None)
        except Exception as exc:
            raise TokenizeError(f"--input {args.input}: cannot read input: {_one_line(exc)}")
        if first is None:
            raise TokenizeError(f"--input {args.input}: input is empty (no rows)")
        columns = list(first.keys())
    if args.text_key not in columns:
        avail = ", ".join(map(str, columns)) or "(none)"
        raise TokenizeError(f"--input {args.input}: text column '{args.text_key}' not found; "
                            f"available columns: {avail} (choose one with --text-key)")
    features = getattr(ds, "features", None)
    if features is not None and args.text_key in features:
        feat = features[args.text_key]
        dtype = getattr(feat, "dtype", None)
        if dtype not in ("string", "large_string", "null"):
            kind = dtype or type(feat).__name__
            raise TokenizeError(f"--input {args.input}: column '{args.text_key}' holds {kind} values, "
                                f"not text; choose the text column with --text-key "
                                f"(columns: {', '.join(map(str, columns))})")
    n_rows = None
    if hasattr(ds, "__len__"):
        n_rows = len(ds)
        if n_rows == 0:
            raise TokenizeError(f"--input {args.input}: input is empty (no rows)")
    elif first is None:
        try:
            first = next(iter(ds), None)
        except Exception as exc:
            raise TokenizeError(f"--input {args.input}: cannot read input: {_one_line(exc)}")
        if first is None:
            raise TokenizeError(f"--input {args.input}: input is empty (no rows)")
    return ds, n_rows


def _iter_text_batches(ds, args: argparse.Namespace) -> Iterator[List[str]]:
    """Yield lists of document texts (None becomes ""), validating the value type."""
    key = args.text_key
    try:
        ds = ds.select_columns([key])
    except Exception:
        pass
    row = 0
    try:
        for batch in ds.iter(batch_size=args.batch_size):
            texts = batch[key]
            for i, t in enumerate(texts):
                if t is None:
                    texts[i] = ""
                elif not isinstance(t, str):
                    raise TokenizeError(
                        f"--input {args.input}: column '{key}' holds {type(t).__name__} values, "
                        f"not text (row {row + i}); choose the text column with --text-key")
            row += len(texts)
            yield texts
    except TokenizeError:
        raise
    except Exception as exc:
        raise TokenizeError(f"--input {args.input}: cannot read input near row {row}: {_one_line(exc)}")


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

def _precheck_tokenizer(spec: str, requested_dtype: str) -> None:
    """Fail fast, before the slow transformers import: a missing tokenizer folder, or (when the
    folder has a tokenizer.json, read with the light `tokenizers` library) a vocabulary that
    cannot fit the requested dtype. The full checks run again on the loaded tokenizer."""
    expanded = os.path.expanduser(spec)
    if _looks_like_path(spec) and not os.path.exists(expanded):
        raise TokenizeError(f"--tokenizer {spec}: folder not found")
    tj = os.path.join(expanded, "tokenizer.json")
    if requested_dtype == "auto" or not os.path.isfile(tj):
        return
    try:
        from tokenizers import Tokenizer

        n = Tokenizer.from_file(tj).get_vocab_size(with_added_tokens=True)
    except Exception:
        return  # let transformers report it
    choose_dtype(n, requested_dtype)


def _load_tokenizer(spec: str):
    expanded = os.path.expanduser(spec)
    if _looks_like_path(spec) and not os.path.exists(expanded):
        raise TokenizeError(f"--tokenizer {spec}: folder not found")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(expanded if os.path.exists(expanded) else spec)
    except Exception as exc:
        raise TokenizeError(f"--tokenizer {spec}: cannot load tokenizer: {_one_line(exc)}")


def choose_dtype(vocab_size: int, requested: str = "auto") -> str:
    """Token dtype name for a vocabulary: 'uint16' if every id fits, else 'int32'.

    Raises TokenizeError when `requested` cannot hold the vocabulary."""
    fits16 = vocab_size <= UINT16_VOCAB_LIMIT
    if requested == "auto":
        return "uint16" if fits16 else "int32"
    if requested == "uint16" and not fits16:
        raise TokenizeError(f"--dtype uint16: tokenizer vocabulary of {vocab_size} tokens is too large "
                            f"for uint16 (ids up to {UINT16_VOCAB_LIMIT - 1}); use --dtype int32 or auto")
    if requested == "int32" and vocab_size > (1 << 31):
        raise TokenizeError(f"--dtype int32: tokenizer vocabulary of {vocab_size} tokens is too large")
    return requested


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------

_WORKER: Dict[str, Any] = {}


def _init_worker(tokenizer_spec: str, eos_id: Optional[int], max_id: int, dtype: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER.get("tokenizer") is None:            # spawn start method: load it here
        _quiet_libraries()
        _WORKER["tokenizer"] = _load_tokenizer(tokenizer_spec)
    _WORKER.update(eos_id=eos_id, max_id=max_id, dtype=dtype)


def _encode_batch(texts: List[str]):
    """Tokenize a batch: returns (flat ids in the target dtype, per-document lengths).

    A document that yields no tokens gets length 0 (the parent skips it, EOS not added)."""
    import numpy as np

    tok = _WORKER["tokenizer"]
    eos_id, max_id = _WORKER["eos_id"], _WORKER["max_id"]
    ids = tok(texts, add_special_tokens=False, return_attention_mask=False,
              return_token_type_ids=False, verbose=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    if eos_id is not None:
        lengths += lengths > 0
        flat_iter = itertools.chain.from_iterable(x + [eos_id] if x else x for x in ids)
    else:
        flat_iter = itertools.chain.from_iterable(ids)
    flat = np.fromiter(flat_iter, dtype=np.int64, count=int(lengths.sum()))
    if flat.size:
        hi, lo = int(flat.max()), int(flat.min())
        if hi > max_id or lo < 0:
            bad = hi if hi > max_id else lo
            raise TokenizeError(f"--tokenizer: produced token id {bad}, outside the {_WORKER['dtype']} "
                                f"range 0..{max_id} chosen from its vocabulary size; use --dtype int32")
    return flat.astype(_WORKER["dtype"]), lengths


def _ordered_results(batches: Iterable[List[str]], pool, inflight: int):
    """Like pool.imap(_encode_batch, batches) in input order, but with at most `inflight` batches
    queued, so a streamed corpus is never read ahead into memory."""
    if pool is None:
        for b in batches:
            yield len(b), _encode_batch(b)
        return
    pending: deque = deque()
    for b in batches:
        pending.append((len(b), pool.apply_async(_encode_batch, (b,))))
        if len(pending) >= inflight:
            n, res = pending.popleft()
            yield n, res.get()
    while pending:
        n, res = pending.popleft()
        yield n, res.get()


# --------------------------------------------------------------------------------------------
# main routine
# --------------------------------------------------------------------------------------------

class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        except OSError:
            pass


def tokenize_corpus(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the whole conversion for parsed `args`; returns the summary dict.

    Raises TokenizeError for user errors; leaves no output files behind on any failure."""
    t0 = time.perf_counter()

    # 1. cheap checks: output location, input files
    prefix = os.path.abspath(os.path.expanduser(args.output_prefix))
    if os.path.isdir(prefix) or args.output_prefix.endswith(("/", os.sep)):
        raise TokenizeError(f"--output-prefix {args.output_prefix}: is a folder; give a file prefix "
                            f"such as {os.path.join(args.output_prefix, 'corpus')}")
    out_dir = os.path.dirname(prefix)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TokenizeError(f"--output-prefix {args.output_prefix}: {out_dir} is not a folder")
    local = resolve_local_input(args.input)
    _precheck_tokenizer(args.tokenizer, args.dtype)

    # 2. dataset: load, text column present, not empty
    ds = _load_dataset(args, local)
    ds, n_rows = _check_columns(ds, args)

    # 3. tokenizer: EOS, vocabulary vs dtype
    tokenizer = _load_tokenizer(args.tokenizer)
    vocab_size = len(tokenizer)
    dtype = choose_dtype(vocab_size, args.dtype)
    max_id = (UINT16_VOCAB_LIMIT - 1) if dtype == "uint16" else (1 << 31) - 1
    eos_id = None
    if args.append_eos:
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise TokenizeError(f"--tokenizer {args.tokenizer}: has no EOS token; use a tokenizer with "
                                f"one, or pass --no-append-eos")
        if not 0 <= eos_id <= max_id:
            raise TokenizeError(f"--tokenizer {args.tokenizer}: EOS id {eos_id} does not fit in {dtype}")

    # 4. megatron's writer (heavy import: torch), quietly
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    final = prefix + DOCUMENT_SUFFIX
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx, tmp_json = final + ".bin" + tag, final + ".idx" + tag, final + ".json" + tag
    created_dir = None
    if not os.path.isdir(out_dir):
        try:
            os.makedirs(out_dir)
            created_dir = out_dir
        except OSError as exc:
            raise TokenizeError(f"--output-prefix {args.output_prefix}: cannot create folder {out_dir}: "
                                f"{exc.strerror or exc}")

    # workers forked below inherit the loaded tokenizer; in-process encoding uses it directly
    _WORKER.update(tokenizer=tokenizer, eos_id=eos_id, max_id=max_id, dtype=dtype)

    pool = None
    builder = None
    t_loop = time.perf_counter()
    bar = None
    old_term = None
    ok = False
    documents = tokens = skipped = rows = 0
    stopped_early = None
    try:
        if args.workers > 1:
            import multiprocessing as mp

            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded fork"
                pool = mp.get_context(method).Pool(
                    args.workers, initializer=_init_worker,
                    initargs=(args.tokenizer, eos_id, max_id, dtype))
        try:
            old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread
            old_term = None

        try:
            builder = IndexedDatasetBuilder(tmp_bin, dtype=getattr(np, dtype))
        except OSError as exc:
            raise TokenizeError(f"--output-prefix {args.output_prefix}: cannot write {tmp_bin}: "
                                f"{exc.strerror or exc}")

        if not args.quiet:
            from tqdm.auto import tqdm

            if args.max_tokens:
                bar = tqdm(total=args.max_tokens, unit="tok", unit_scale=True, mininterval=1.0,
                           desc="tokenizing", dynamic_ncols=True, file=sys.stderr)
            else:
                total = n_rows
                if total is not None and args.max_documents:
                    total = min(total, args.max_documents)
                bar = tqdm(total=total, unit="doc", mininterval=1.0,
                           desc="tokenizing", dynamic_ncols=True, file=sys.stderr)

        inflight = max(2, 2 * args.workers)
        for n_in_batch, (flat, lengths) in _ordered_results(_iter_text_batches(ds, args), pool, inflight):
            offset = 0
            tokens_before, rows_before = tokens, rows
            for length in lengths.tolist():
                rows += 1
                if length == 0:
                    skipped += 1
                    continue
                builder.add_document(flat[offset: offset + length], [length])
                offset += length
                documents += 1
                tokens += length
                if args.max_documents and documents >= args.max_documents:
                    stopped_early = "max_documents"
                    break
                if args.max_tokens and tokens >= args.max_tokens:
                    stopped_early = "max_tokens"
                    break
            if bar is not None:
                if args.max_tokens:
                    bar.update(min(tokens, args.max_tokens) - min(tokens_before, args.max_tokens))
                    bar.set_postfix_str(f"{documents:,} docs", refresh=False)
                else:
                    bar.update(rows - rows_before)
                    bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
            if stopped_early:
                break
        if bar is not None:
            bar.close()
            bar = None
        if documents == 0:
            raise TokenizeError(f"--input {args.input}: input is empty (no non-empty documents in "
                                f"column '{args.text_key}')")
        try:
            builder.finalize(tmp_idx)
        except OSError as exc:
            raise TokenizeError(f"--output-prefix {args.output_prefix}: cannot write index: "
                                f"{exc.strerror or exc}")

        now = time.perf_counter()
        seconds, loop_seconds = now - t0, now - t_loop
        summary = {
            "output_prefix": final,
            "files": [final + ".bin", final + ".idx"],
            "documents": documents,
            "tokens": tokens,
            "rows_read": rows,
            "skipped_empty_documents": skipped,
            "stopped_early": stopped_early,
            "seconds": round(seconds, 3),            # wall clock, imports and loading included
            "tokenize_seconds": round(loop_seconds, 3),  # workers start .. index written
            "tokens_per_second": round(tokens / loop_seconds, 1) if loop_seconds > 0 else None,
            "dtype": dtype,
            "vocab_size": vocab_size,
            "eos_token_id": eos_id,
            "append_eos": bool(args.append_eos),
            "tokenizer": args.tokenizer,
            "input": args.input,
            "config": args.config if local is None else None,
            "split": args.split if local is None else None,
            "text_key": args.text_key,
            "workers": args.workers,
            "max_tokens": args.max_tokens,
            "max_documents": args.max_documents,
        }
        with open(tmp_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        os.replace(tmp_bin, final + ".bin")
        os.replace(tmp_idx, final + ".idx")
        os.replace(tmp_json, final + ".json")
        ok = True
        return summary
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        _WORKER.clear()
        if not ok:
            if builder is not None:
                try:
                    builder.data_file.close()
                except Exception:
                    pass
            _remove([tmp_bin, tmp_idx, tmp_json])
            if created_dir is not None:
                try:
                    os.rmdir(created_dir)
                except OSError:
                    pass


def _error(msg: str) -> None:
    msg = " ".join(str(msg).split())  # guarantee one line
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 user error, 1 bug, 130/143 stop)."""
    args = parse_args(argv, prog)
    _quiet_libraries()  # the command line shows our progress and errors, not library chatter
    if args.sft:
        if args.seq_length is None:
            _error("--sft needs --seq-length (the training sequence length)")
            return EXIT_USER_ERROR
        from .sft import run_cli

        args.max_pairs = args.max_documents
        return run_cli(args)
    try:
        s = tokenize_corpus(args)
    except TokenizeError as exc:
        _error(str(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _error("interrupted; no output written")
        return 130
    except _Terminated:
        _error("terminated (SIGTERM); no output written")
        return 143
    extra = f", stopped by --{s['stopped_early'].replace('_', '-')}" if s["stopped_early"] else ""
    skipped = f", {s['skipped_empty_documents']:,} empty skipped" if s["skipped_empty_documents"] else ""
    print(f"done: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}) in "
          f"{s['seconds']:.1f} s ({s['tokenize_seconds']:.1f} s tokenizing, "
          f"{s['tokens_per_second'] or 0:,.0f} tokens/s){skipped}{extra}\n"
          f"wrote {s['output_prefix']}.bin/.idx (+ .json summary); "
          f"use data path {s['output_prefix']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m ratplus_megatron.data.tokenize_corpus"))
