"""bench/scan.py's argument handling on CPU: bad --shapes / --fwd-variants are one-line errors
before any GPU work, and forward configs get the plan's defaults in their names."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "bench/scan.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_bad_arguments_are_one_line_errors(tmp_path):
    p = _run("--shapes", "8x")
    assert p.returncode == 2 and "expected BxT" in p.stderr.strip().splitlines()[-1]
    p = _run("--fwd-variants", '[{"kernel": "seq"')
    assert p.returncode == 2 and "expected a JSON list of forward option dicts" in p.stderr.strip().splitlines()[-1]
    p = _run("--fwd-variants", '[{"kernel": "seq", "stages": 3}]')
    assert p.returncode == 2 and "stages=3 is for kernel='chunk' only" in p.stderr.strip().splitlines()[-1]
    p = _run("--fwd-variants", '[{"lbw": 2}]')
    assert p.returncode == 2 and "unknown forward options ['lbw']" in p.stderr.strip().splitlines()[-1]
    p = _run("--fwd-variants", str(tmp_path / "missing.json"))
    assert p.returncode == 2 and "missing.json" in p.stderr.strip().splitlines()[-1]


def test_config_names_fill_in_the_plan_defaults(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import scan
    assert scan.fname({"kernel": "chunk", "BT": 4, "stages": 3}) == "chunk-BH4-BT4-wauto-CTauto-S3"
    assert scan.fname({"kernel": "seq", "BH": 1}) == "seq-BH1-BD128-W8"
    assert scan.fname(dict(kernel="chunk", BH=2, BT=2, num_warps=1, CT=64, BD=64, prefetch=False)) == \
        "chunk-BH2-BT2-w1-CT64-BD64-nopf"
    assert scan._variants('[{"kernel": "seq", "BH": 1}]') == [{"kernel": "seq", "BH": 1}]
