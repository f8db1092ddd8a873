"""Scores, tables and plots of NIAH predictions written by ``eval/niah.py``.

    python eval/report.py OUT [OUT2 ...] [--labels attention,memory] [--out DIR] [--metric M]

reads ``OUT/pred/<length>/<method>_<budget>_<source>/<task>.jsonl`` (and the shard files
``<task>.shard-I-of-N.jsonl`` of ``eval/niah.py --shard``) of one or several runs (e.g.
an attention model and a memory model) and writes ``DIR/summary.json``, ``DIR/summary.md`` (rows
method x budget x K/V source [x model], columns the tasks and their average) and
``DIR/accuracy_vs_budget.png`` (average accuracy against budget; colour = method, line style =
K/V source or model). With one OUT and no --out, DIR is OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `eval` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ratplus_megatron.files import write_atomic  # noqa: E402
from eval.ruler.scoring import METRICS, score  # noqa: E402
from eval.ruler.tasks import TASKS  # noqa: E402

METHOD_ORDER = ("dense", "dilated", "quest", "moba", "snapkv", "random")
SHARD_INFIX = ".shard-"  # <task>.shard-I-of-N.jsonl: shard I of N of a task's predictions


def shard_suffix(shard: int, shards: int) -> str:
    return "" if shards == 1 else f"{SHARD_INFIX}{shard}-of-{shards}"


def read_jsonl(path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by an interrupted run
                    continue
    except FileNotFoundError:
        pass
    return rows


def budget_value(label: str, length: int) -> float:
    """'full' -> 1, '1-16' -> 0.0625, 't512' -> 512 / length, '0.1' -> 0.1."""
    if label == "full":
        return 1.0
    if label.startswith("t"):
        return int(label[1:]) / length
    if "-" in label:
        a, b = label.split("-", 1)
        return float(Fraction(int(a), int(b)))
    return float(label)


def run_predictions(run_dir: Path) -> dict[str, dict[int, dict]]:
    """task -> sample index -> prediction, over one run folder's files: ``<task>.jsonl`` and the
    shard files of the same task (a sample found twice counts once)."""
    by_task: dict[str, dict[int, dict]] = {}
    for f in sorted(Path(run_dir).glob("*.jsonl")):
        task = f.name[: -len(".jsonl")].split(SHARD_INFIX)[0]
        recs = by_task.setdefault(task, {})
        for r in read_jsonl(f):
            if "index" in r and "pred" in r:
                recs.setdefault(r["index"], r)
    return {t: recs for t, recs in by_task.items() if recs}


def collect(out, label: str | None = None, metric: str = "string_match_all") -> list[dict]:
    """One row per (length, method, budget, source, task) of one run directory."""
    rows = []
    pred = Path(out) / "pred"
    if not pred.is_dir():
        return rows
    for length_dir in sorted(pred.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not length_dir.is_dir() or not length_dir.name.isdigit():
            continue
        length = int(length_dir.name)
        for run_dir in sorted(length_dir.iterdir()):
            parts = run_dir.name.split("_", 2)
            if not run_dir.is_dir() or len(parts) != 3:
                continue
            method, budget, source = parts
            for task, by_index in run_predictions(run_dir).items():
                recs = [by_index[i] for i in sorted(by_index)]
                rows.append({
                    "model": label, "length": length, "method": method, "budget": budget,
                    "budget_value": budget_value(budget, length), "source": source, "task": task,
                    "n": len(recs),
                    "score": score([r["pred"] for r in recs], [r["outputs"] for r in recs], metric),
                })
    return rows


def _method_rank(method: str) -> tuple:
    """Table/plot order: by the base method (a variant such as quest+int8 right after its base)."""
    base = method.split("+")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def _key(r):
    return (r["length"], r["model"] or "", _method_rank(r["method"]), -r["budget_value"], r["source"])


def group_runs(rows: list[dict]) -> list[dict]:
    """Rows of a table: one per (model, length, method, budget, source) with per-task scores and
    the average over the tasks present."""
    runs: dict[tuple, dict] = {}
    for r in sorted(rows, key=_key):
        k = (r["model"], r["length"], r["method"], r["budget"], r["source"])
        run = runs.setdefault(k, {"model": r["model"], "length": r["length"], "method": r["method"],
                                  "budget": r["budget"], "budget_value": r["budget_value"],
                                  "source": r["source"], "tasks": {}, "n": {}})
        run["tasks"][r["task"]] = r["score"]
        run["n"][r["task"]] = r["n"]
    out = list(runs.values())
    for run in out:
        run["average"] = round(sum(run["tasks"].values()) / len(run["tasks"]), 2)
    return out


def markdown(runs: list[dict], metric: str) -> str:
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in runs)]
    multi = len({r["model"] for r in runs}) > 1
    lines = [f"# RULER NIAH ({metric}, x100)", ""]
    for length in sorted({r["length"] for r in runs}):
        sel = [r for r in runs if r["length"] == length]
        lines += [f"## length {length}", ""]
        head = (["model"] if multi else []) + ["method", "budget", "K/V"] + tasks + ["avg"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for r in sel:
            budget = r["budget"].replace("-", "/") if r["budget"] != "full" else "full"
            cells = ([r["model"] or ""] if multi else []) + [r["method"], budget, r["source"]]
            cells += [f"{r['tasks'][t]:.1f}" if t in r["tasks"] else "" for t in tasks]
            cells.append(f"{r['average']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    n = sorted({v for r in runs for v in r["n"].values()})
    lines.append(f"Samples per cell: {', '.join(map(str, n))}. K/V: mem = the memory's K~/V~, plain = standard "
                 "K/V; sel-X.comp-Y = selection on X, computation on Y.")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in runs})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(METHOD_ORDER)}
    styles = ["-", "--", ":", "-."]
    variants = sorted({(r["model"] or "", r["source"]) for r in runs})
    style = {v: styles[i % len(styles)] for i, v in enumerate(variants)}
    for ax, length in zip(axes[0], lengths):
        sel = [r for r in runs if r["length"] == length]
        for (model, source) in variants:
            for method in sorted({r["method"] for r in sel}, key=_method_rank):
                pts = sorted((r["budget_value"], r["average"]) for r in sel
                             if r["method"] == method and r["source"] == source and (r["model"] or "") == model)
                if not pts:
                    continue
                name = " ".join(x for x in (method, model, source) if x)
                if method == "dense":
                    ax.axhline(pts[0][1], color="k", ls=style[(model, source)], lw=1, label=name)
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors.get(method, "C9"),
                        ls=style[(model, source)], label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (fraction of context)")
        ax.set_ylabel("NIAH accuracy (avg over tasks)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"context {length}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Accuracy vs budget: attention (plain K/V) vs memory (K~/V~)")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"), binary=True)
    plt.close(fig)


class NoPredictions(ValueError):
    pass


def write_reports(outs, labels=None, dest=None, metric="string_match_all", extra=None,
                  require_predictions=False) -> dict:
    """Score the predictions of one or more runs and write summary.json / .md / the plot into dest.
    require_predictions: a run without predictions raises NoPredictions before anything is written."""
    outs = [Path(o) for o in outs]
    labels = list(labels) if labels else [None] * len(outs)
    dest = Path(dest) if dest else outs[0]
    rows = []
    for o, lab in zip(outs, labels):
        found = collect(o, lab if len(outs) > 1 else None, metric)
        if require_predictions and not found:
            raise NoPredictions(f"{o}: no predictions under {o / 'pred'} (eval/niah.py --out writes them)")
        rows += found
    return write_tables(group_runs(rows), dest, metric, extra)


def write_tables(runs: list[dict], dest, metric="string_match_all", extra=None) -> dict:
    """summary.json, summary.md and the plot (when matplotlib is there) of table rows into dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary = {"metric": metric, **(extra or {}), "runs": runs}
    write_atomic(dest / "summary.json", lambda f: f.write(json.dumps(summary, indent=1) + "\n"))
    write_atomic(dest / "summary.md", lambda f: f.write(markdown(runs, metric) if runs else "no predictions\n"))
    if runs:
        try:
            plot(runs, dest / "accuracy_vs_budget.png")
        except ImportError:  # e.g. a GPU machine without matplotlib: tables only; replot later from summary.json
            print("note: matplotlib is not installed: no accuracy_vs_budget.png (summary.json/.md written)",
                  file=sys.stderr)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python eval/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("outs", nargs="+", help="run directories written by eval/niah.py")
    p.add_argument("--labels", help="comma-separated names of the runs (e.g. attention,memory)")
    p.add_argument("--out", help="where to write the reports (default: the first run directory)")
    p.add_argument("--metric", default="string_match_all", choices=sorted(METRICS))
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else None
    if labels and len(labels) != len(a.outs):
        print(f"error: {len(labels)} labels for {len(a.outs)} runs", file=sys.stderr)
        return 2
    if len(a.outs) > 1 and not labels:
        labels = [Path(o).name for o in a.outs]
    for o in a.outs:  # a typo would otherwise give an empty report
        if not Path(o).is_dir():
            print(f"error: {o}: no such directory", file=sys.stderr)
            return 2
    try:
        s = write_reports(a.outs, labels, a.out, a.metric, require_predictions=True)
    except NoPredictions as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(s['runs'])} rows -> {Path(a.out or a.outs[0]) / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
