"""Everything in bench/results/replication/ that is computed from other files there, in one place:
the pooled comparisons (compare.py), the retention tables (retention.py), and the rescoring of each
collect folder's kept predictions against its summary.json.

    python bench/replication/derived.py            # regenerate every derived folder (no GPU)
    python bench/replication/derived.py --check    # regenerate into a temp dir, compare the JSON and
                                                   # markdown with what is committed, rescore every
                                                   # collect folder; exit 1 on any difference

A new collect folder (a session's models) joins by adding its DIR=TAG to the recipes below and
rerunning; `--check` then proves the published numbers follow from the kept predictions.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (puts the repo and bench/ on the path)
import retention  # noqa: E402
from eval.ruler.scoring import SAMPLE_METRICS, postprocess_pred  # noqa: E402

REPO = HERE.parents[1]
R = "bench/results/replication"  # paths as the outputs record them ("from"), relative to the repo
RUN4, RETRAINED = f"{R}=run4", [f"{R}/int8=retrained", f"{R}/int8_attention=retrained"]
SEED1235 = [f"{R}/seed1235_attention=seed1235", f"{R}/seed1235_memory=seed1235"]
S1235_MEMORY, S1236_ATTENTION = SEED1235[1], f"{R}/seed1236_attention=seed1236"

# (tool, output folder under R, DIR=TAG inputs in order, --methods)
RECIPES = [
    ("compare", "compare_run4_retrained", [RUN4, *RETRAINED], "dense,quest"),
    ("compare", "compare_seeds", [RUN4, *RETRAINED, *SEED1235, S1236_ATTENTION], "dense,quest"),
    ("compare", "compare_moba_snapkv", [RUN4, S1235_MEMORY, S1236_ATTENTION], "dense,moba,snapkv"),
    ("retention", "retention_run4", [RUN4], None),
    ("retention", "retention_retrained", RETRAINED, "quest"),
    ("retention", "retention_seeds", [RUN4, *RETRAINED, *SEED1235, S1236_ATTENTION], "quest"),
    ("retention", "retention_seed1235", SEED1235, "quest"),
    ("retention", "retention_run4_memory_s1235", [RUN4, S1235_MEMORY], "moba,snapkv"),
    ("retention", "retention_moba_snapkv", [RUN4, S1235_MEMORY, S1236_ATTENTION], "moba,snapkv"),
]
TOOLS = {"compare": compare.main, "retention": retention.main}


def regenerate(dest: Path) -> list[str]:
    """Every recipe's output under dest/NAME; the names."""
    for tool, name, dirs, methods in RECIPES:
        TOOLS[tool]([*dirs, "--out", str(dest / name), *(["--methods", methods] if methods else [])])
    return [name for _, name, _, _ in RECIPES]


def differing(fresh: Path, kept: Path) -> list[str]:
    """The JSON and markdown files of `kept` that `fresh` lacks or holds otherwise (plots are left
    out: their bytes follow the matplotlib version)."""
    if not kept.is_dir():
        return [f"{kept.relative_to(REPO)}: not committed (run derived.py without --check)"]
    out = []
    for f in sorted(kept.iterdir()):
        if f.suffix in (".json", ".md") and (not (fresh / f.name).is_file() or (fresh / f.name).read_bytes() != f.read_bytes()):
            out.append(str(f.relative_to(REPO)))
    return out


def rescore(folder: Path) -> tuple[int, list[str]]:
    """Score folder/predictions.jsonl.gz with RULER's string_match_all and compare every cell of
    folder/summary.json (a task's score x 100, 2 decimals); predictions of a cell the summary
    lacks count as a mismatch too; (cells checked, mismatches)."""
    metric = SAMPLE_METRICS["string_match_all"]
    sums: dict = {}
    with gzip.open(folder / "predictions.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            cell = sums.setdefault((r["model"], r["config"], r["task"]), [0.0, 0])
            cell[0] += metric(postprocess_pred(r["pred"]), r["outputs"])
            cell[1] += 1
    checked, bad = 0, []
    for run in json.loads((folder / "summary.json").read_text())["runs"]:
        config = f"{run['method']}_{run['budget'].replace('/', '-')}_{run['source']}"
        for task, want in run["tasks"].items():
            checked += 1
            total, n = sums.pop((run["model"], config, task), (0.0, 0))
            if n != run["n"][task] or abs(100.0 * total / max(n, 1) - want) > 0.006:
                bad.append(f"{folder.relative_to(REPO)}: {run['model']} {config} {task}: summary {want}, "
                           f"predictions {100.0 * total / max(n, 1):.2f} over {n}")
    bad += [f"{folder.relative_to(REPO)}: {model} {config} {task}: {n} predictions, no summary cell"
            for (model, config, task), (_, n) in sorted(sums.items())]
    return checked, bad


def collect_folders() -> list[Path]:
    root = REPO / R
    return [d for d in [root, *sorted(root.iterdir())]
            if d.is_dir() and (d / "predictions.jsonl.gz").is_file() and (d / "summary.json").is_file()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/replication/derived.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="regenerate into a temp dir and compare with the committed files; rescore the predictions")
    a = p.parse_args(argv)
    with contextlib.chdir(REPO):  # the outputs record their inputs as given, relative to the repo
        return check() if a.check else regenerate_here()


def regenerate_here() -> int:
    names = regenerate(REPO / R)
    print(f"regenerated {len(names)} folders under {R}: {', '.join(names)}")
    return 0


def check() -> int:
    problems = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        for name in regenerate(Path(tmp)):
            problems += differing(Path(tmp) / name, REPO / R / name)
    folders = collect_folders()
    cells = 0
    for folder in folders:
        n, bad = rescore(folder)
        cells += n
        problems += bad
    for line in problems:
        print(f"differs: {line}", file=sys.stderr)
    print(f"{len(RECIPES)} derived folders regenerated and compared; {cells} cells of {len(folders)} collect "
          "folders rescored from their predictions: " + ("all reproduce" if not problems else f"{len(problems)} differ"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
