"""Robustness to sparsity sample by sample: of the samples a model answers fully with dense
attention, how much of their score it keeps under each sparse method and budget.

    python bench/replication/retention.py DIR[=TAG] [DIR[=TAG] ...] --out OUT [--methods quest,moba]

A table of averages mixes two things: how many samples a model gets right densely, and how many of
those it still gets right when attention is sparse. The paper's claim is about the second, so this
conditions on the first. Each DIR holds the predictions.jsonl.gz that the replication folders keep
(one record per generation: model, config METHOD_BUDGET_SOURCE, task, index, pred, outputs); models
are renamed "MODEL (TAG)" as in compare.py (TAG: the folder's name unless given). Per model, sparse
configuration and K/V source:

* own:    over the samples this model scores 1.0 densely (same K/V source), the mean sparse score
          x 100, and how many samples that is;
* common: the same over the samples that *every* model read here scores 1.0 densely: the same
          prompts for all models, so the numbers compare across models directly.

Samples are pooled over the tasks (a task with more dense-correct samples weighs more); the JSON
also has each task's numbers. Writes OUT/retention.json and OUT/retention.md (with each kind's mean,
a kind being the model name before any -sSEED).

Uncertainty: each common number has a 95 % percentile bootstrap interval over the common samples,
and each pair of kinds at one method and budget gets the difference of their means on the common
samples with a paired bootstrap interval (the same resampled prompts for every model; --boot
resamples, fixed seed). These intervals say how much the prompts drawn could move a number; they
do not include training-seed variance, which only more models of each kind show.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as rp  # noqa: E402  (model_kind; puts the repo and bench/ on the path)
from compare import folder_file  # noqa: E402
from _runs import write_json  # noqa: E402
from eval.report import budget_value  # noqa: E402
from eval.ruler.scoring import SAMPLE_METRICS, postprocess_pred  # noqa: E402
from ratplus_megatron.files import write_atomic  # noqa: E402

_score = SAMPLE_METRICS["string_match_all"]


def parse_config(config: str) -> tuple[str, str, str]:
    """'quest+int8_1-16_mem' -> ('quest+int8', '1-16', 'mem')."""
    parts = config.rsplit("_", 2)
    if len(parts) != 3:
        raise SystemExit(f"error: prediction config {config!r} is not METHOD_BUDGET_SOURCE")
    return parts[0], parts[1], parts[2]


def load(specs: list[str]) -> tuple[dict, dict[str, str]]:
    """{model: {(method, budget, source): {(task, index): score}}} over every DIR[=TAG], models
    renamed "MODEL (TAG)"; and each new name's kind."""
    scores: dict = {}
    kind_of: dict = {}
    for spec in specs:
        path, tag = folder_file(spec, "predictions.jsonl.gz", "keep predictions.jsonl.gz")
        with gzip.open(path, "rt") as f:
            for line in f:
                r = json.loads(line)
                name = f"{r['model']} ({tag})"
                kind_of[name] = rp.model_kind(r["model"])
                cell = scores.setdefault(name, {}).setdefault(parse_config(r["config"]), {})
                cell[(r["task"], int(r["index"]))] = _score(postprocess_pred(r["pred"]), r["outputs"])
    if not scores:
        raise SystemExit("error: no predictions read")
    return scores, kind_of


def _dense(cells: dict, source: str, model: str) -> dict:
    """The model's dense scores on this K/V source, else its only dense configuration."""
    dense = {k: v for k, v in cells.items() if k[0] == "dense"}
    same = [v for k, v in dense.items() if k[2] == source]
    if same:
        return same[0]
    if len(dense) == 1:
        return next(iter(dense.values()))
    raise SystemExit(f"error: {model}: no dense predictions on K/V source {source!r} to condition on")


def _kept(sparse: dict, keys: set, what: str) -> dict:
    """Mean sparse score x 100 over `keys`, overall and per task."""
    missing = keys - sparse.keys()
    if missing:
        task, index = min(missing)
        raise SystemExit(f"error: {what}: no prediction for {len(missing)} dense-correct samples "
                         f"(e.g. {task} #{index}); finish that evaluation first")
    by_task: dict = {}
    for key in keys:
        by_task.setdefault(key[0], []).append(sparse[key])
    every = [x for xs in by_task.values() for x in xs]
    mean = lambda xs: round(100.0 * sum(xs) / len(xs), 1) if xs else None  # noqa: E731
    return {"n": len(every), "kept": mean(every),
            "tasks": {t: {"n": len(xs), "kept": mean(xs)} for t, xs in sorted(by_task.items())}}


def retention(scores: dict, kind_of: dict[str, str], methods: set[str] | None = None,
              boot: int = 2000) -> tuple[list[dict], list[dict]]:
    """One row per (model, sparse method, budget, source): 'own' and 'common' (see the docstring),
    the common number with its bootstrap interval; and the differences between kinds."""
    correct = {}
    for model, cells in scores.items():
        for source in {k[2] for k in cells}:
            dense = _dense(cells, source, model)
            correct[(model, source)] = {key for key, s in dense.items() if s >= 1.0}
    common_set = set.intersection(*correct.values())
    common = sorted(common_set)
    # One draw of resampled prompts shared by every cell, so differences are paired.
    draws = np.random.default_rng(0).integers(0, len(common), (boot, len(common))) if common else None
    rows, vectors = [], []
    for model, cells in sorted(scores.items()):
        for (method, budget, source), sparse in cells.items():
            if method == "dense" or (methods and method not in methods):
                continue
            what = f"{model} {method}_{budget}_{source}"
            row = {"model": model, "kind": kind_of[model], "method": method, "budget": budget, "source": source,
                   "own": _kept(sparse, correct[(model, source)], what), "common": _kept(sparse, common_set, what)}
            vec = np.array([sparse[k] for k in common], dtype=np.float64)
            row["common"]["ci"] = _interval(vec, draws)
            rows.append(row)
            vectors.append(vec)
    if not rows:
        raise SystemExit("error: no sparse predictions (check --methods)")
    order = sorted(range(len(rows)), key=lambda i: _row_key(rows[i]))
    rows, vectors = [rows[i] for i in order], [vectors[i] for i in order]
    return rows, kind_differences(rows, vectors, draws)


def _row_key(r: dict) -> tuple:
    return (r["method"], -_fraction(r["budget"]), r["kind"], r["model"], r["source"])


def _interval(vec: np.ndarray, draws: np.ndarray | None) -> list[float] | None:
    """95 % percentile bootstrap interval of 100 x mean(vec) over the resampled prompts."""
    if draws is None:
        return None
    lo, hi = np.percentile(100.0 * vec[draws].mean(axis=1), [2.5, 97.5])
    return [round(float(lo), 1), round(float(hi), 1)]


def kind_differences(rows: list[dict], vectors: list[np.ndarray], draws: np.ndarray | None) -> list[dict]:
    """Per method and budget, for each two (kind, source) groups of different kinds: the later kind's
    mean common score minus the earlier's (models of a kind averaged prompt by prompt), with a
    paired bootstrap interval."""
    groups: dict = {}
    for r, vec in zip(rows, vectors):
        groups.setdefault((r["method"], r["budget"]), {}).setdefault((r["kind"], r["source"]), []).append(vec)
    out = []
    for (method, budget), cells in groups.items():
        keys = sorted(cells)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                if a[0] == b[0] or draws is None:
                    continue
                d = np.mean(cells[b], axis=0) - np.mean(cells[a], axis=0)
                # (+ 0.0 below: a difference that rounds to zero prints as +0.0, never -0.0)
                out.append({"method": method, "budget": budget, "a": f"{a[0]} ({a[1]})", "b": f"{b[0]} ({b[1]})",
                            "models": [len(cells[a]), len(cells[b])], "difference": round(100.0 * float(d.mean()), 1) + 0.0,
                            "ci": _interval(d, draws), "a_range": _range(cells[a]), "b_range": _range(cells[b])})
    return out


def _fraction(budget: str) -> float:
    """Sort key of a budget label: '1-16' -> 0.0625 (token budgets 'tN', whose length the
    predictions do not record, sort by N, above every fraction)."""
    return budget_value(budget, length=1)


def kind_means(rows: list[dict]) -> list[dict]:
    """Per (kind, method, budget, source): the mean of its models' 'own' and 'common' numbers."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["method"], -_fraction(r["budget"]), r["kind"], r["budget"], r["source"]), []).append(r)
    out = []
    for (method, _, kind, budget, source), rs in sorted(cells.items()):
        avg = lambda xs: round(sum(xs) / len(xs), 1)  # noqa: E731
        out.append({"kind": kind, "method": method, "budget": budget, "source": source, "models": len(rs),
                    "own": avg([r["own"]["kept"] for r in rs]), "common": avg([r["common"]["kept"] for r in rs])})
    return out


def _range(vectors: list[np.ndarray]) -> list[float]:
    """Lowest and highest model of a group (common kept x 100): the spread between trainings."""
    means = [100.0 * float(v.mean()) for v in vectors]
    return [round(min(means), 1), round(max(means), 1)]


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]}, {ci[1]}]" if ci else ""


def table(rows: list[dict], means: list[dict], diffs: list[dict], boot: int) -> str:
    n_common = rows[0]["common"]["n"]
    lines = ["# Share of the dense score kept under sparsity, on dense-correct samples (string_match_all, x100)", "",
             f"own: the model's own dense-correct samples (n); common: the {n_common} samples every model "
             f"here answers fully densely (the same prompts for all); 95 % CI: bootstrap over those samples "
             f"({boot} resamples; training-seed variance is not in it).", "",
             "| method | budget | K/V | model | own n | own kept | common kept | common 95 % CI |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget'].replace('-', '/')} | {r['source']} | {r['model']} | "
                     f"{r['own']['n']} | {r['own']['kept']} | {r['common']['kept']} | {_ci(r['common']['ci'])} |")
    lines += ["", "## Mean per kind", "", "| method | budget | K/V | kind | models | own kept | common kept |",
              "|---|---|---|---|---|---|---|"]
    for m in means:
        lines.append(f"| {m['method']} | {m['budget'].replace('-', '/')} | {m['source']} | {m['kind']} | "
                     f"{m['models']} | {m['own']} | {m['common']} |")
    if diffs:
        lines += ["", "## Difference between kinds on the common samples", "",
                  "B - A, each kind's models averaged prompt by prompt; 95 % CI: paired bootstrap over the prompts. "
                  "The model ranges (lowest and highest model of each kind) show the spread between trainings, "
                  "which the interval leaves out: where they overlap, the difference is not established.", "",
                  "| method | budget | A | B | models A, B | B - A | 95 % CI | A models | B models |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in diffs:
            lines.append(f"| {d['method']} | {d['budget'].replace('-', '/')} | {d['a']} | {d['b']} | "
                         f"{d['models'][0]}, {d['models'][1]} | {d['difference']:+} | {_ci(d['ci'])} | "
                         f"{_ci(d['a_range'])} | {_ci(d['b_range'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/replication/retention.py", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR[=TAG]")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", help="comma-separated sparse methods to keep (default: all)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples for the intervals (default 2000)")
    a = p.parse_args(argv)
    if a.boot < 100:
        raise SystemExit(f"error: --boot {a.boot}: give at least 100 resamples")
    rows, diffs = retention(*load(a.dirs), set(a.methods.split(",")) if a.methods else None, boot=a.boot)
    means = kind_means(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "retention.json", {"from": a.dirs, "common_samples": rows[0]["common"]["n"],
                                        "boot": a.boot, "rows": rows, "kinds": means, "differences": diffs}, quiet=True)
    write_atomic(out / "retention.md", lambda f: f.write(table(rows, means, diffs, a.boot)))
    print(f"wrote {out}: retention.json/.md ({len(rows)} rows, {rows[0]['common']['n']} common samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
