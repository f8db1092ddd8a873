"""Replication results side by side: several `run.py collect` outputs (one per session, seed or
retraining) in one table, one plot, and each cell's spread over the models of one kind.

    python bench/replication/compare.py DIR[=TAG] [DIR[=TAG] ...] --out OUT [--methods dense,quest]

Each DIR holds the summary.json that collect wrote; its models are renamed "MODEL (TAG)" (TAG:
the folder's name unless given). Writes OUT/summary.json, OUT/summary.md,
OUT/accuracy_vs_budget.png (when matplotlib is there), OUT/spread.md and OUT/spread.json (per
kind, method, budget and K/V source: every model's average over the tasks, their mean, min and
max; between two kinds: the difference of means, whether their models separate, and an exact
permutation p over the models) and OUT/spread.png (per sparse method, each kind's mean with its
lowest-highest band). A model's kind is its name
before any -sSEED: the seeds of one run and the reruns of several sessions pool together.

    python bench/replication/compare.py bench/results/replication=run4 \\
        bench/results/replication/int8=retrained bench/results/replication/int8_attention=retrained \\
        --methods dense,quest --out bench/results/replication/compare_run4_retrained
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as rp  # noqa: E402  (seed_spread, write_spread; puts the repo and bench/ on the path)


def folder_file(spec: str, name: str, hint: str) -> tuple[Path, str]:
    """DIR[=TAG] -> (DIR/name, TAG or DIR's own name); a missing file is refused in one line."""
    folder, _, tag = spec.partition("=")
    path = Path(folder) / name
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (give folders that {hint})")
    return path, tag or Path(folder).resolve().name


def load(specs: list[str], methods: set[str] | None) -> tuple[list[dict], dict[str, str]]:
    """The runs of every DIR[=TAG], models renamed "MODEL (TAG)"; and each new name's kind."""
    runs, kind_of = [], {}
    for spec in specs:
        path, tag = folder_file(spec, "summary.json", "run.py collect wrote")
        for r in json.loads(path.read_text())["runs"]:
            if methods and r["method"] not in methods:
                continue
            name = f"{r['model']} ({tag})"
            kind_of[name] = rp.model_kind(r["model"])
            runs.append({**r, "model": name})
    if not runs:
        raise SystemExit("error: no rows (check --methods)")
    return runs, kind_of


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/replication/compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR[=TAG]")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", help="comma-separated methods to keep (default: all)")
    a = p.parse_args(argv)
    runs, kind_of = load(a.dirs, set(a.methods.split(",")) if a.methods else None)
    out = Path(a.out)
    from eval.report import write_tables

    write_tables(runs, out, extra={"from": a.dirs})
    spread = rp.seed_spread(runs, kind_of)
    contrasts = rp.write_spread(out, "spread", spread, "per model of each kind", "models")
    print(f"wrote {out}: summary.json/.md, spread.json/.md/.png ({len(spread)} cells, "
          f"{len(contrasts)} contrasts between kinds), the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
