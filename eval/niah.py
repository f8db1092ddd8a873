"""RULER NIAH with dense and sparse inference, on attention and memory models.

    python eval/niah.py --model HF_DIR_OR_ID --tasks all --lengths 4096 \
        --methods dense,quest,moba,snapkv,dilated,random --budgets 1/8,1/16,1/32 \
        --samples 100 --out OUT [--kv-source mem --kv-source plain] [--batch-size 4] \
        [--dtype bf16] [--device cuda] [--seed 42] [--sft-data] [--shard I/N]

1. generates the RULER samples with the model's own tokenizer (``eval.ruler``) into
   ``OUT/data/<length>/<task>.jsonl`` (and, with --sft-data, the train split into OUT/train/);
2. decodes every method x budget x K/V source greedily (128 new tokens, stop at EOS) with
   ``eval.engine``, appending predictions to
   ``OUT/pred/<length>/<method>_<budget>_<source>/<task>.jsonl`` (a rerun skips finished samples);
3. scores them (RULER's string_match_all by default) and writes ``OUT/summary.json``,
   ``OUT/summary.md`` and ``OUT/accuracy_vs_budget.png`` (``eval/report.py``).

``--shard I/N`` (e.g. the tasks of a Slurm job array, ``slurm/niah.sh``): this process decodes the
samples whose index is I mod N, into ``<task>.shard-I-of-N.jsonl`` beside the unsharded files. Every
shard writes the same data files (seeded, atomic). A rerun with any sharding skips the samples
that any file of the run already holds. The shard that finds every prediction in place when it
ends writes the reports (or run ``python eval/report.py OUT``).

``dense`` runs once per K/V source (budget 'full'). Method options (Quest page size, MoBA block,
SnapKV window / pooling, dilated window / prefix, ...) are listed by --help; their meaning and the
K/V source semantics are in ``eval/engine/spec.py``. Errors (unknown task or method, a budget above
1 or below one block, a model without a tokenizer, ...) are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python eval/niah.py` puts eval/ first on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

from eval.engine.spec import (METHOD_VARIANTS, METHODS, KVSource, MethodSpec, SpecError,  # noqa: E402
                              parse_budgets, parse_kv_source, parse_method_name)
from eval.ruler.generate import LengthTooSmallError, check_fits, parse_lengths, write_task_file  # noqa: E402
from eval.ruler.scoring import METRICS  # noqa: E402
from eval.ruler.tasks import TOKENS_TO_GENERATE, resolve_tasks  # noqa: E402


def parse_methods(spec: str) -> list[str]:
    """Method names: METHODS, their variants (METHOD_VARIANTS: quest+int8), or all (the METHODS)."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if names == ["all"]:
        return list(METHODS)
    unknown = [m for m in names if m not in METHODS and m not in METHOD_VARIANTS]
    if unknown:
        raise SpecError(f"unknown method(s) {', '.join(unknown)}; known: all, "
                        f"{', '.join(METHODS + tuple(METHOD_VARIANTS))}")
    if not names:
        raise SpecError("no method given")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python eval/niah.py",
                                description="RULER NIAH with dense / dilated / Quest / MoBA / SnapKV / random "
                                            "sparse inference (see eval/engine/spec.py).")
    p.add_argument("--model", required=True, help="HF model dir or hub id (with its tokenizer)")
    p.add_argument("--tasks", default="all", help="'all' or a comma-separated list of RULER NIAH tasks")
    p.add_argument("--lengths", default="4096", help="comma-separated target lengths (4096,8k,...)")
    p.add_argument("--methods", default="dense,quest",
                   help=f"comma-separated: {', '.join(METHODS)} (or all), or a variant: quest+int8 = Quest with its "
                        "page bounds stored as int8 rounded outward, a step per page (the scores read half the "
                        "bytes and stay an upper bound of q.k)")
    p.add_argument("--budgets", default="1/16", help="comma-separated fractions (1/16, 0.0625) or token counts (512)")
    p.add_argument("--samples", type=int, default=100, help="samples per task and length (RULER: 500)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sft-data", action="store_true", help="also write the train split (SFT data) under OUT/train/")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--decode", choices=("auto", "eager", "static", "graph"), default="auto",
                   help="decoding loop: graph replays each step from a CUDA graph (auto: graph on CUDA, eager "
                        "elsewhere)")
    p.add_argument("--kv-source", action="append", default=None,
                   help="mem | plain | selection=mem|plain,compute=mem|plain; repeat for several "
                        "(default: mem for memory models, plain otherwise)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-new-tokens", type=int, default=TOKENS_TO_GENERATE)
    p.add_argument("--metric", default="string_match_all", choices=sorted(METRICS))
    p.add_argument("--shard", default="0/1", help="I/N: decode the samples whose index is I mod N (a job "
                                                  "array's task I of N); the last shard to end writes the reports")
    g = p.add_argument_group("method options")
    g.add_argument("--page-size", type=int, default=16, help="Quest page size")
    g.add_argument("--quest-dense-layers", type=int, default=2, help="first N layers dense (Quest and random)")
    g.add_argument("--quest-no-force-current", action="store_true", help="Quest: do not force the current page")
    g.add_argument("--quest-min-pages", type=int, default=0,
                   help="Quest: keep at least N pages (default 0: the budget alone). Quest's evaluation "
                        "variant: --quest-no-force-current --quest-min-pages 3")
    g.add_argument("--per-query-head", action="store_true",
                   help="Quest/MoBA/random/SnapKV: select per query head (default: per KV head, group queries "
                        "averaged; SnapKV then repeats K/V to the query heads, as the original)")
    g.add_argument("--moba-block", type=int, default=64, help="MoBA block size (top-k = budget / block)")
    g.add_argument("--random-block", type=int, default=16, help="random selector block size")
    g.add_argument("--snap-window", type=int, default=32)
    g.add_argument("--snap-kernel", type=int, default=7)
    g.add_argument("--snap-pool", choices=("avg", "max"), default="avg")
    g.add_argument("--dilated-window", type=int, default=0, help="RAT+ local window W (chunk D = 1/budget)")
    g.add_argument("--dilated-prefix", type=int, default=0, help="RAT+ initial tokens P")
    return p


def make_specs(args, methods, budgets, sources) -> list[MethodSpec]:
    specs = []
    for source in sources:
        for name in methods:
            method, variant = parse_method_name(name)
            base = MethodSpec(method=method, source=source, page_size=args.page_size,
                              quest_force_current=not args.quest_no_force_current,
                              quest_dense_layers=args.quest_dense_layers, quest_min_pages=args.quest_min_pages,
                              moba_block=args.moba_block,
                              random_block=args.random_block, random_dense_layers=args.quest_dense_layers,
                              snap_window=args.snap_window, snap_kernel=args.snap_kernel, snap_pool=args.snap_pool,
                              dilated_window=args.dilated_window, dilated_prefix=args.dilated_prefix,
                              per_query_head=args.per_query_head, seed=args.seed, **variant)
            for b in budgets:
                s = base.with_budget(b)
                if s not in specs:
                    specs.append(s)
    return specs


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SpecError(f"bad --shard {text!r}: want I/N, e.g. 0/8") from None
    if n < 1 or not 0 <= i < n:
        raise SpecError(f"bad --shard {text!r}: want 0 <= I < N")
    return i, n


# files transformers loads tokenizers from: a directory with none of them gets a plain message
# (transformers' own starts "Couldn't instantiate the backend tokenizer from one of:")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        import ratplus_megatron.hf  # noqa: F401  (memory-model configs resolve without remote code)
    except ImportError:
        pass
    if (os.path.isabs(name) or name.startswith(".")) and not os.path.exists(name):
        raise SpecError(f"--model {name}: no such directory")  # not a hub id: say so, not the hub's rules
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure is one line
        if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, f)) for f in TOKENIZER_FILES):
            raise SpecError(f"--model {name}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)}); "
                            "save the model's tokenizer beside it") from None
        raise SpecError(f"model {name!r} has no usable tokenizer: {_first_line(e)}") from None
    if tok is None or not hasattr(tok, "encode"):
        raise SpecError(f"model {name!r} has no tokenizer")
    return tok


def run_dir(out, length, spec: MethodSpec) -> Path:
    return Path(out) / "pred" / str(length) / spec.label


def pred_path(out, length, spec: MethodSpec, task: str, shard: tuple[int, int] = (0, 1)) -> Path:
    from eval.report import shard_suffix

    return run_dir(out, length, spec) / f"{task}{shard_suffix(*shard)}.jsonl"


def finished_indices(out, length, spec: MethodSpec) -> dict[str, set[int]]:
    """task -> the samples with a prediction in any of the run's files (sharded or not); one read
    of the run's folder."""
    from eval.report import run_predictions

    return {task: set(recs) for task, recs in run_predictions(run_dir(out, length, spec)).items()}


def run_task(engine, tokenizer, spec, samples, path: Path, done: set[int], batch_size, max_new, bar,
             decode="auto") -> None:
    todo = [s for s in samples if s["index"] not in done]
    bar.update(len(samples) - len(todo))
    if not todo:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a", encoding="utf-8") as f:  # an interrupted last line: end it
            f.write("\n")
    with open(path, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            prompts = [tokenizer(s["input"] + s["answer_prefix"], add_special_tokens=True)["input_ids"]
                       for s in batch]
            outs = engine.generate(prompts, spec, max_new, decode=decode)
            for s, p, o in zip(batch, prompts, outs):
                rec = {"index": s["index"], "pred": tokenizer.decode(o["tokens"], skip_special_tokens=True),
                       "outputs": s["outputs"], "length": s["length"], "prompt_tokens": len(p),
                       "new_tokens": len(o["tokens"])}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from eval.engine.engine import decode_mode
    try:
        tasks = resolve_tasks(args.tasks)
        lengths = parse_lengths(args.lengths)
        methods = parse_methods(args.methods)
        budgets = parse_budgets(args.budgets)
        sources = [parse_kv_source(s) for s in args.kv_source] if args.kv_source else None
        if args.samples < 1:
            raise SpecError(f"bad --samples {args.samples}: must be at least 1")
        if args.batch_size < 1:
            raise SpecError(f"bad --batch-size {args.batch_size}: must be at least 1")
        shard = parse_shard(args.shard)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # budgets against the longest prompt each length allows (before loading anything big)
        probe = make_specs(args, methods, budgets, sources or [KVSource("plain", "plain")])
        for length in lengths:
            for s in probe:
                s.check(length - TOKENS_TO_GENERATE)  # RULER's prompts leave 128 tokens for the answer
        try:
            decode_mode(args.decode, device)
        except ValueError as e:
            raise SpecError(f"--decode {args.decode}: {e}") from None
        tokenizer = load_tokenizer(args.model)
        for length in lengths:
            for t in tasks:
                check_fits(t, length, tokenizer)
    except (SpecError, LengthTooSmallError, ValueError) as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from eval.engine import Engine, default_source
    from eval.report import write_reports

    try:
        engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=device, tokenizer=tokenizer)
        sources = sources or [default_source(engine.model)]
        for s in sources:
            engine.check_source(s)
    except SpecError as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: cannot load model {args.model!r}: {_first_line(e)}", file=sys.stderr)
        return 2
    specs = make_specs(args, methods, budgets, sources)
    out = Path(args.out)

    data: dict[tuple[int, str], list[dict]] = {}
    splits = ["test"] + (["train"] if args.sft_data else [])
    with tqdm(total=len(lengths) * len(tasks) * args.samples * len(splits), desc="data", unit="sample",
              dynamic_ncols=True) as bar:
        for split in splits:
            for length in lengths:
                for t in tasks:
                    path = write_task_file(t, length, args.samples, tokenizer, out, seed=args.seed, split=split,
                                           skip_existing=True, on_sample=lambda: bar.update(1))
                    if split == "test":
                        from eval.report import read_jsonl

                        data[(length, t.name)] = read_jsonl(path)

    mine = {key: [s for s in rows if s["index"] % shard[1] == shard[0]] for key, rows in data.items()}
    total = len(specs) * sum(len(rows) for rows in mine.values())
    desc = "niah" if shard[1] == 1 else f"niah shard {shard[0]}/{shard[1]}"
    try:
        with tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True) as bar:
            for length in lengths:
                for spec in specs:
                    done = finished_indices(out, length, spec)  # a task's run adds to its own files only
                    for t in tasks:
                        bar.set_postfix_str(f"{length} {spec.label} {t.name}")
                        run_task(engine, tokenizer, spec, mine[(length, t.name)],
                                 pred_path(out, length, spec, t.name, shard), done.get(t.name, set()),
                                 args.batch_size, args.max_new_tokens, bar, args.decode)
    except SpecError as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    # other shards may still be decoding: the reports come from the one that finds nothing missing
    missing = 0
    for length in lengths:
        for spec in specs:
            done = finished_indices(out, length, spec)
            missing += sum(len({s["index"] for s in data[(length, t.name)]} - done.get(t.name, set())) for t in tasks)
    if missing:
        print(f"shard {shard[0]}/{shard[1]} done; {missing} predictions of other shards are not there yet: the "
              f"last shard to end writes the reports (or: python eval/report.py {out})")
        return 0
    summary = write_reports([out], dest=out, metric=args.metric,
                            extra={"model": args.model, "memory_model": engine.memory, "dtype": args.dtype,
                                   "seed": args.seed})
    print(f"{len(summary['runs'])} rows -> {out / 'summary.md'}, {out / 'accuracy_vs_budget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
