"""bench/replication/run.py (issue #9's driver) end to end at toy size on CPU.

prep (offline corpora -> indexed datasets, RULER train split -> SFT sequences, test split) ->
pretrain both models -> SFT from the pretrained checkpoints -> mcore-to-hf -> eval/niah.py on
the attention model and on the memory model with both K/V sources -> collect. Then a rerun of
every stage finds everything done. Also: the two GPU recipes differ only in model.memory.enabled.
"""
import gzip
import json
from pathlib import Path
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

HERE = REPO / "bench" / "replication"


def test_recipes_identical_but_memory():
    from ratplus_megatron.train.config import load_config

    a, m = (yaml.safe_load((HERE / f"{k}.yaml").read_text()) for k in ("attention", "memory"))
    assert a["model"]["memory"].pop("enabled") is False and m["model"]["memory"].pop("enabled") is True
    assert a == m
    for k in ("attention", "memory"):
        cfg = load_config(str(HERE / f"{k}.yaml"))
        assert cfg.data.seq_length == 4096 and cfg.model.build().max_position_embeddings == 4096
        # model S (36M / 38M): the size that learned to retrieve within one lease (README, run 4)
        assert 35e6 <= cfg.model.build().num_parameters() <= 40e6


def _driver():
    import importlib.util

    spec = importlib.util.spec_from_file_location("replication_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seeds_name_the_models(tmp_path):
    run = _driver()
    size = run.apply_sets(run.SIZES["full"], ["seeds=[1234, 1235]"])
    assert run.models(size) == [("attention", "attention", None), ("attention-s1235", "attention", 1235),
                                ("memory", "memory", None), ("memory-s1235", "memory", 1235)]
    assert run.models(run.SIZES["full"]) == [("attention", "attention", None), ("memory", "memory", None)]
    ov = run.phase_overrides(size, tmp_path, "memory", "pretrain", "memory-s1235", 1235)
    assert ov[-1] == "train.seed=1235" and f"checkpoint.save={tmp_path}/runs/memory-s1235-pretrain" in ov
    assert f"checkpoint.init_from={tmp_path}/runs/memory-s1235-short" in ov
    sft = run.phase_overrides(size, tmp_path, "memory", "sft", "memory-s1235", 1235)
    assert f"checkpoint.init_from={tmp_path}/runs/memory-s1235-pretrain" in sft and sft[-1] == "train.seed=1235"
    jobs = run.eval_jobs(tmp_path, run.apply_sets(size, ["tasks=niah_single_1", "methods=dense,quest"]))
    assert [j[:2] for j in jobs] == [("attention", "plain"), ("attention-s1235", "plain"), ("memory", "mem"),
                                     ("memory-s1235", "mem")]
    for bad in ("seeds=[1, 1]", "seeds=[-1]", "seeds=3", "seeds=[true]"):
        with pytest.raises(ValueError, match="seeds takes"):
            run.apply_sets(run.SIZES["full"], [bad])


def test_set_changes_one_recipe_field_and_refuses_unknown_ones(capsys):
    run = _driver()
    size = run.apply_sets(run.SIZES["full"], ["drill_weight=0", "blend=[0.9, 0.08, 0.02]",
                                              "combos=[[attention, plain]]"])
    assert size["drill_weight"] == 0.0 and size["blend"] == (0.9, 0.08, 0.02)
    assert size["combos"] == (("attention", "plain"),)
    assert run.SIZES["full"]["drill_weight"] == 6.0  # the recipe itself is untouched
    # the combos choose the models: the memory model alone is one GPU's work
    assert run.kinds(run.apply_sets(run.SIZES["full"], ["combos=[[memory, mem]]"])) == ("memory",)
    assert run.kinds(run.SIZES["full"]) == ("attention", "memory")
    mixed = run.apply_sets(run.SIZES["full"], ['combos=[[memory, "selection=mem,compute=plain"]]'])
    assert mixed["combos"] == (("memory", "selection=mem,compute=plain"),)  # any source eval/niah.py takes
    for bad in ("combos=[[memroy, mem]]", "combos=[[memory, kv]]", "combos=[]", "combos=[memory]"):
        with pytest.raises(ValueError, match="combos takes"):
            run.apply_sets(run.SIZES["full"], [bad])
    for bad in ("blend=[1, 2]", "blend=[0, 0, 0, 0]", "blend=[0.5, -0.1, 0.3, 0.3]"):
        with pytest.raises(ValueError, match="blend takes"):
            run.apply_sets(run.SIZES["full"], [bad])
    # a zero weight leaves its corpus out of the blend
    ov = run.pretrain_overrides(run.apply_sets(run.SIZES["full"], ["blend=[0.85,0.13,0.02,0]"]), Path("/w"), "attention")
    assert "data.prefixes=[/w/data/retrieval_text_document,/w/data/synthetic_text_document," \
           "/w/data/essays_text_document]" in ov and "data.weights=[0.85,0.13,0.02]" in ov
    ov = run.pretrain_overrides(run.SIZES["full"], Path("/w"), "attention")  # the recipe: four corpora
    assert "data.weights=[0.6,0.13,0.02,0.25]" in ov and "/w/data/copy_text_document]" in " ".join(ov)
    for bad in ("nope=1", "drill_weight=many", "overrides=[]", "drill_weight"):
        with pytest.raises(ValueError, match="drill_weight|KEY=VALUE"):
            run.apply_sets(run.SIZES["full"], [bad])
    assert run.main(["prep", "--set", "nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope=1" in err[0] and "--train-set" in err[0]


@pytest.mark.slow
def test_driver_toy_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    work, results = tmp_path / "work", tmp_path / "results"
    cmd = [sys.executable, "bench/replication/run.py", "all", "--size", "toy", "--work", str(work),
           "--results", str(results), "--workers", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    rows = {(r["model"], r["method"], r["budget"], r["source"]) for r in summary["runs"]}
    for method in ("quest", "quest+int8", "moba", "snapkv", "random"):
        assert ("attention", method, "1-4", "plain") in rows
        assert ("memory", method, "1-4", "mem") in rows and ("memory", method, "1-4", "plain") in rows
    assert ("attention", "dense", "full", "plain") in rows and ("memory", "dense", "full", "mem") in rows
    assert all(set(r["n"].values()) == {2} for r in summary["runs"])
    assert (results / "summary.md").is_file()
    # every generation kept: rescoring them reproduces each cell of the summary
    from eval.ruler.scoring import score

    with gzip.open(results / "predictions.jsonl.gz", "rt") as f:
        preds = [json.loads(line) for line in f]
    cells = {}
    for p in preds:
        cells.setdefault((p["model"], p["config"], p["task"]), []).append(p)
    for r in summary["runs"]:
        config = f"{r['method']}_{r['budget']}_{r['source']}"
        for task, value in r["tasks"].items():
            got = cells.pop((r["model"], config, task))
            assert score([p["pred"] for p in got], [p["outputs"] for p in got]) == pytest.approx(value)
    assert not cells and len(preds) == 2 * sum(len(r["tasks"]) for r in summary["runs"])
    info = json.loads((results / "run.json").read_text())
    assert info["training"]["memory-sft"]["iterations"] == 3 and info["sft_data"]["pairs"] == 6
    assert info["device"] == "cpu" and info["versions"]["torch"] and info["commit"] and info["command"].startswith("bench/replication/run.py all")
    for kind in ("attention", "memory"):  # the recall probe and held-out loss during pretraining
        evals = info["training"][f"{kind}-pretrain"]["evals"]
        assert [e["iteration"] for e in evals] == [2, 4]
        assert all(e["probe_loss"] > 0 and e["copy_loss"] > 0 and e["val_loss"] > 0 for e in evals)
    # a second call finds every stage done and starts no trainer or eval worker
    proc = subprocess.run(cmd[:2] + ["pretrain,sft,eval"] + cmd[3:], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("already done") == 4 and "0 (model, K/V source, task, methods) jobs" in proc.stdout

    # a second seed of the attention model: trained, converted and evaluated beside the first (whose
    # stages are all found done), each cell's spread over the seeds in seeds.json / seeds.md
    seeds = ["--set", "seeds=[1234, 7]", "--set", "combos=[[attention, plain]]", "--set", "methods=dense,quest",
             "--trainers-per-gpu", "2"]
    proc = subprocess.run(cmd + seeds, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pretrain: attention already done" in proc.stdout and "pretrain: attention-s7 on CPU" in proc.stdout
    assert (work / "hf" / "attention-s7" / "config.json").is_file()
    summary = json.loads((results / "summary.json").read_text())
    rows = {(r["model"], r["method"], r["budget"]) for r in summary["runs"]}
    assert rows == {(m, "dense", "full") for m in ("attention", "attention-s7")} | \
        {(m, "quest", "1-4") for m in ("attention", "attention-s7")}
    spread = json.loads((results / "seeds.json").read_text())["cells"]
    assert [(c["method"], sorted(c["averages"])) for c in spread] == [
        ("dense", ["attention", "attention-s7"]), ("quest", ["attention", "attention-s7"])]
    assert all(c["min"] <= c["mean"] <= c["max"] for c in spread)
    assert "| attention | quest | 1-4 | plain | 2 |" in (results / "seeds.md").read_text()
    assert (results / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # per-kind mean and band
    train = json.loads((results / "run.json").read_text())["training"]
    # another seed, another initialisation: the first logged losses differ
    assert train["attention-s7-pretrain"]["first_logged_loss"] != train["attention-pretrain"]["first_logged_loss"]


def test_retrieval_documents_are_seeded_and_answered():
    """Each planted fact that is asked about is answered with its value, later in the same document."""
    from ratplus_megatron.data.retrieval_corpus import RetrievalDocs

    gen = RetrievalDocs(seed=3, target_chars=3000, filler_sentences=["A prose sentence about work.", "Another one."])
    again = RetrievalDocs(seed=3, target_chars=3000, filler_sentences=["A prose sentence about work.", "Another one."])
    assert gen.document(5) == again.document(5) and gen.document(5) != gen.document(6)
    assert RetrievalDocs(seed=4, target_chars=3000).document(5) != gen.document(5)
    styles = set()
    for i in range(60):
        doc = gen.document(i)
        assert 100 < len(doc) < 6000
        last = last_line_of(doc)
        # the answer's values all occur earlier in the document, before the final question
        head = doc[: doc.rindex(last)]
        values = ANSWER_VALUES.findall(last)
        for v in values:
            assert v in head, (i, v, last)
        styles.add("noise" if "Keep reading" in doc or "On we go" in doc or "We walk on" in doc else "other")
    assert styles == {"noise", "other"}
    for i in range(20):  # the recall probe: the document cut before its last answer
        row = gen.probe_row(i)
        assert row["input"] + row["target"] == gen.document(i)
        assert row["target"].startswith(" " + row["outputs"][0]) and row["outputs"][0] in last_line_of(gen.document(i))
    # drills: only facts (8-32 of them, no filler), then questions whose answers are all among them
    drills = RetrievalDocs(seed=3, target_chars=3000, filler_sentences=["A prose sentence about work."],
                           drill_weight=1e9)
    for i in range(10):
        doc = drills.document(i)
        assert "prose sentence" not in doc and "Keep reading" not in doc
        values = ANSWER_VALUES.findall(last_line_of(doc))
        assert all(v in doc[: doc.rindex(last_line_of(doc))] for v in values), (i, doc)
    assert RetrievalDocs(seed=3, target_chars=3000, drill_weight=0.0).document(7) == \
        RetrievalDocs(seed=3, target_chars=3000).document(7)


def test_copy_documents_repeat_a_stretch_found_by_content():
    """Each copied stretch is a run of consecutive items of the list that opens the document."""
    from ratplus_megatron.data.copy_corpus import copy_document, copy_probe_row
    from ratplus_megatron.data.synthetic_corpus import make_word_list

    words = make_word_list(300, seed=1)
    assert copy_document(4, 0, words) == copy_document(4, 0, words) != copy_document(5, 0, words)
    starts = set()
    for i in range(40):
        doc = copy_document(i, 0, words)
        head, *copies = re.split(r"\nAgain: |\nRepeat from [^:\n]*: |\nOnce more, from [^:\n]*: | \| |\nCopy: |\n\n", doc)
        for c in copies:
            assert c in head, (i, c)  # items joined as in the list: a stretch of consecutive items
            starts.add(not head.startswith(c))
    assert starts == {True, False}  # copies start mid-list too: no fixed offset predicts them
    rows = [r for r in (copy_probe_row(i, 0, words) for i in range(40)) if r]
    assert len(rows) > 20
    for r in rows:  # the copy probe: the document cut after the first two items of its last stretch
        assert r["input"] + r["target"] == copy_document(r["index"], 0, words)
        assert r["target"].strip() in r["input"]  # predictable by copying alone


ANSWER_VALUES = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|\b\d{3,9}\b")  # uuids, numbers


def last_line_of(doc: str) -> str:
    return doc.rstrip().split("\n")[-1]


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    """The GPU machine may lack matplotlib: tables are still written (replot later from summary.json)."""
    import eval.report as report

    pred = tmp_path / "run" / "pred" / "512" / "dense_full_plain"
    pred.mkdir(parents=True)
    (pred / "niah_single_1.jsonl").write_text(json.dumps({"index": 0, "pred": " 123", "outputs": ["123"]}) + "\n")

    def no_plot(*a, **k):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "plot", no_plot)
    summary = report.write_reports([tmp_path / "run"], dest=tmp_path / "out")
    assert summary["runs"][0]["average"] == 100.0
    assert (tmp_path / "out" / "summary.md").is_file() and not (tmp_path / "out" / "accuracy_vs_budget.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def _write_probe_rows(work: Path) -> None:
    """WORK/probe/{probe,copy}.jsonl as prep writes them: a few short held-out retrieval and copy documents."""
    from ratplus_megatron.data.copy_corpus import copy_probe_row
    from ratplus_megatron.data.retrieval_corpus import RetrievalDocs

    gen = RetrievalDocs(seed=0, target_chars=600)
    run = _driver()
    run.write_probe_rows(work, "probe", (gen.probe_row(10**7 + i) for i in range(8)))
    rows = (copy_probe_row(i, 0, ["alpha", "beta", "gamma"]) for i in range(200))
    run.write_probe_rows(work, "copy", [r for r in rows if r and len(r["input"]) < 600][:8])


def test_sweep_arms_parse_and_get_their_own_probe(tmp_path):
    """sweep.py: an arm is the recipe + its overrides (+ recipe.KEY=VALUE); a different sequence
    length gets the probe rebuilt at that length; every arms file in the repo parses and loads."""
    from ratplus_megatron.train.config import load_config

    sys.path.insert(0, str(HERE))
    try:
        import sweep
    finally:
        sys.path.remove(str(HERE))
    with pytest.raises(SystemExit, match="needs name=NAME and kind"):
        sweep.parse_arm("name=x kind=hybrid optimizer.lr=1e-3")
    arm = sweep.parse_arm("name=x kind=memory optimizer.lr=2e-3 recipe.blend=[0.5,0.2,0.05,0.25]")
    assert arm == {"name": "x", "kind": "memory", "sets": ["blend=[0.5,0.2,0.05,0.25]"],
                   "overrides": ["optimizer.lr=2e-3"]}
    _write_probe_rows(tmp_path)
    size = dict(sweep.rp.SIZES["full"])
    cmd = sweep.arm_command(sweep.parse_arm("name=s kind=attention data.seq_length=1024 "
                                            "recipe.blend=[0.5,0.2,0.05,0.25]"), tmp_path, size)
    ov = cmd[cmd.index("--config") + 2:]
    assert ov[-2:] == [f"train.probe={tmp_path}/data/probe1024_sft", f"train.probes={{copy: {tmp_path}/data/copy1024_sft}}"]
    assert (tmp_path / "data" / "probe1024_sft.tokens.npy").is_file()
    assert load_config(sweep.rp.recipe("attention"), ov).train.probes == {"copy": f"{tmp_path}/data/copy1024_sft"}
    assert any(o.startswith("data.weights=[0.5,0.2,0.05,0.25]") for o in ov)
    assert sweep.rp.probe_overrides(tmp_path, 16) == ["train.probe=null", "train.probes={}"]  # nothing fits: left out
    assert f"checkpoint.save={tmp_path}/runs/s" in ov
    arm_a = {"name": "a", "kind": "memory", "overrides": [], "probe_loss": [[2, 3.0]], "copy_loss": [[2, 2.5]], "last_iteration": 2}
    arm_b = {**arm_a, "name": "b", "overrides": ["checkpoint.init_from=/w/runs/a"]}
    (tmp_path / "s.json").write_text(json.dumps({"arms": [arm_a, arm_b]}))
    assert sweep.main(["plot", str(tmp_path / "s.json"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no such file"):
        sweep.main(["plot", str(tmp_path / "missing.json"), "--out", str(tmp_path / "d.png")])
    for arms in sorted((HERE / "arms").glob("*.txt")):
        for line in arms.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                a = sweep.parse_arm(line)
                ov = sweep.rp.pretrain_overrides(sweep.rp.apply_sets(size, a["sets"]), tmp_path, a["kind"])
                load_config(sweep.rp.recipe(a["kind"]), ov + a["overrides"])  # raises on a bad override


def test_short_phase_overrides(tmp_path):
    """short_length/short_iters: a first phase at the short length with the same tokens per step and
    its own probe; pretraining then starts from its weights (end to end: README's toy command)."""
    run = _driver()
    _write_probe_rows(tmp_path)
    size = run.apply_sets(run.SIZES["full"], ["short_length=512", "short_iters=1500", "short_lr=0", "short_min_lr=0"])
    ov = run.phase_overrides(size, tmp_path, "memory", "short")
    last = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in ov}  # later overrides win, as in the trainer
    assert last["data.seq_length"] == "512" and last["batch.global_batch_size"] == "64"
    assert last["batch.micro_batch_size"] == "64" and last["train.train_iters"] == "1500"
    assert last["train.train_tokens"] == "null" and last["train.probe"] == f"{tmp_path}/data/probe512_sft"
    assert last["checkpoint.save"] == f"{tmp_path}/runs/memory-short" and "checkpoint.init_from" not in last
    assert "optimizer.lr" not in last  # the recipe's unless short_lr is set
    fast = run.phase_overrides(run.apply_sets(size, ["short_lr=3e-3", "short_min_lr=3e-4"]), tmp_path, "memory", "short")
    assert fast[-3:-1] == ["optimizer.lr=0.003", "optimizer.min_lr=0.0003"]
    assert last["train.probes"] == f"{{copy: {tmp_path}/data/copy512_sft}}"
    assert (tmp_path / "data" / "probe512_sft.tokens.npy").is_file() and (tmp_path / "data" / "copy512_sft.tokens.npy").is_file()
    assert f"checkpoint.init_from={tmp_path}/runs/memory-short" in run.phase_overrides(size, tmp_path, "memory", "pretrain")
    no_short = run.apply_sets(run.SIZES["full"], ["short_length=0"])
    assert not any("init_from" in o for o in run.phase_overrides(no_short, tmp_path, "memory", "pretrain"))


def test_compare_pools_runs_of_one_kind(tmp_path, capsys):
    """bench/replication/compare.py: collect outputs of several sessions in one table, the spread
    per kind (a seed's -sSEED suffix and the folder tag both pooled), refusals in one line."""
    sys.path.insert(0, str(HERE))
    import compare

    def summary(folder, rows):
        folder.mkdir(parents=True)
        runs = [{"model": m, "length": 4096, "method": meth, "budget": b, "budget_value": bv, "source": "plain",
                 "tasks": {"niah_single_1": avg}, "n": {"niah_single_1": 100}, "average": avg}
                for m, meth, b, bv, avg in rows]
        (folder / "summary.json").write_text(json.dumps({"runs": runs}))

    summary(tmp_path / "a", [("attention", "dense", "full", 1.0, 60.0), ("attention", "quest", "1-4", 0.25, 50.0),
                             ("attention", "moba", "1-4", 0.25, 10.0)])
    summary(tmp_path / "b", [("attention-s7", "dense", "full", 1.0, 80.0), ("attention-s7", "quest", "1-4", 0.25, 70.0)])
    out = tmp_path / "cmp"
    assert compare.main([f"{tmp_path / 'a'}=one", str(tmp_path / "b"), "--methods", "dense,quest", "--out", str(out)]) == 0
    spread = json.loads((out / "spread.json").read_text())["cells"]
    assert [(c["method"], c["averages"], c["mean"]) for c in spread] == [
        ("dense", {"attention (one)": 60.0, "attention-s7 (b)": 80.0}, 70.0),
        ("quest", {"attention (one)": 50.0, "attention-s7 (b)": 70.0}, 60.0)]
    md = (out / "summary.md").read_text()
    assert "| attention (one) | quest | 1/4 |" in md and "moba" not in md
    assert "| attention | quest | 1-4 | plain | 2 | 60.0 | 50.0 | 70.0 |" in (out / "spread.md").read_text()
    assert (out / "spread.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "spread.json").read_text())["contrasts"] == []  # one kind only
    with pytest.raises(SystemExit, match="summary.json: no such file"):
        compare.main([str(tmp_path / "missing"), "--out", str(out)])


def test_kind_contrasts_permute_the_models():
    """run.kind_contrasts: the difference of the kinds' means with an exact permutation p over the
    models (two of each: 6 splits, the observed one and its mirror are the extremes: p = 1/3)."""
    run = _driver()

    def cell(kind, source, averages):
        v = list(averages.values())
        return {"kind": kind, "method": "quest", "budget": "1-4", "source": source, "averages": averages,
                "mean": sum(v) / len(v), "min": min(v), "max": max(v)}

    spread = [cell("attention", "plain", {"a1": 50.0, "a2": 60.0}), cell("memory", "mem", {"m1": 80.0, "m2": 90.0})]
    (c,) = run.kind_contrasts(spread)
    assert (c["a"], c["b"], c["models"], c["difference"], c["separated"], c["p"]) == \
        ("attention (plain)", "memory (mem)", [2, 2], 30.0, True, round(2 / 6, 4))
    # overlapping kinds: 3 + 2 models, |diff| = 5; splits at least as extreme: 7 of 10
    spread = [cell("attention", "plain", {"a1": 50.0, "a2": 60.0, "a3": 70.0}), cell("memory", "mem", {"m1": 55.0, "m2": 75.0})]
    (c,) = run.kind_contrasts(spread)
    assert (c["difference"], c["separated"], c["p"]) == (5.0, False, 0.7)
    assert "| quest | 1-4 | attention (plain) | memory (mem) | 3, 2 | +5.0 | no | 0.700 |" in run.seeds_table(spread, run.kind_contrasts(spread))


def test_retention_conditions_on_dense_correct_samples(tmp_path):
    """bench/replication/retention.py: per model, the sparse score kept on its own dense-correct
    samples and on the samples every model answers densely; refusals in one line."""
    sys.path.insert(0, str(HERE))
    import retention

    def preds(folder, model, source, table):
        folder.mkdir(parents=True)
        with gzip.open(folder / "predictions.jsonl.gz", "wt") as f:
            for config, answers in table.items():
                for i, ok in enumerate(answers):  # samples 0..3 of one task, answer "7" or "7,8"
                    outputs = ["7", "8"] if i == 3 else ["7"]
                    pred = {1.0: " 7, 8", 0.5: " 7", 0.0: " 9"}[ok] if i == 3 else (" 7" if ok else " 9")
                    f.write(json.dumps({"model": model, "config": f"{config}_{source}", "task": "niah_single_1",
                                        "index": i, "pred": pred, "outputs": outputs}) + "\n")

    # attention: dense right on 0, 1, 3; quest keeps 0 and half of 3
    preds(tmp_path / "a", "attention", "plain", {"dense_full": [1, 1, 0, 1.0], "quest_1-16": [1, 0, 1, 0.5]})
    # memory: dense right on 0, 1, 2; quest keeps 0, 1
    preds(tmp_path / "m", "memory-s5", "mem", {"dense_full": [1, 1, 1, 0.5], "quest_1-16": [1, 1, 0, 0.0]})
    out = tmp_path / "ret"
    assert retention.main([str(tmp_path / "a"), f"{tmp_path / 'm'}=x", "--out", str(out)]) == 0
    res = json.loads((out / "retention.json").read_text())
    assert res["common_samples"] == 2  # samples 0 and 1
    got = {r["model"]: (r["kind"], r["own"]["n"], r["own"]["kept"], r["common"]["kept"]) for r in res["rows"]}
    assert got == {"attention (a)": ("attention", 3, 50.0, 50.0), "memory-s5 (x)": ("memory", 3, 66.7, 100.0)}
    md = (out / "retention.md").read_text()
    assert "| quest | 1/16 | mem | memory-s5 (x) | 3 | 66.7 | 100.0 | [100.0, 100.0] |" in md
    assert [(k["kind"], k["own"]) for k in res["kinds"]] == [("attention", 50.0), ("memory", 66.7)]
    # paired over the common samples: memory [1, 1] - attention [1, 0]; resampling two prompts gives 0, 50 or 100
    (diff,) = res["differences"]
    assert (diff["a"], diff["b"], diff["models"], diff["difference"]) == ("attention (plain)", "memory (mem)", [1, 1], 50.0)
    assert diff["ci"] == [0.0, 100.0]
    assert (diff["a_range"], diff["b_range"]) == ([50.0, 50.0], [100.0, 100.0])
    assert "| quest | 1/16 | attention (plain) | memory (mem) | 1, 1 | +50.0 | [0.0, 100.0] | [50.0, 50.0] | [100.0, 100.0] |" in md
    with pytest.raises(SystemExit, match="--boot 5: give at least 100"):
        retention.main([str(tmp_path / "a"), "--boot", "5", "--out", str(out)])
    with pytest.raises(SystemExit, match="predictions.jsonl.gz: no such file"):
        retention.main([str(tmp_path / "missing"), "--out", str(out)])
    with pytest.raises(SystemExit, match="no sparse predictions"):
        retention.main([str(tmp_path / "a"), "--methods", "moba", "--out", str(out)])
    assert retention.parse_config("quest+int8_1-16_mem") == ("quest+int8", "1-16", "mem")
    preds(tmp_path / "short", "attention", "plain", {"dense_full": [1, 1, 1, 1.0], "quest_1-4": [1, 1]})
    with pytest.raises(SystemExit, match=r"attention \(short\) quest_1-4_plain: no prediction for 2 dense-correct"):
        retention.main([str(tmp_path / "short"), "--out", str(out)])


def test_published_results_follow_from_the_kept_predictions():
    """bench/replication/derived.py --check on the committed results: every compare / retention
    folder regenerates to the same JSON and markdown, and every collect folder's predictions
    rescore to its summary.json (real data: the numbers the READMEs quote)."""
    sys.path.insert(0, str(HERE))
    import derived

    assert derived.main(["--check"]) == 0


def test_derived_check_reports_differences(tmp_path, monkeypatch):
    """derived.differing names a changed or missing JSON/markdown file (not a plot); derived.rescore
    names a summary cell its predictions do not give."""
    sys.path.insert(0, str(HERE))
    import derived

    kept, fresh = tmp_path / "kept", tmp_path / "fresh"
    kept.mkdir()
    fresh.mkdir()
    for name, body in (("a.md", "x"), ("b.json", "{}"), ("c.png", "p")):
        (kept / name).write_text(body)
    (fresh / "a.md").write_text("y")
    monkeypatch.setattr(derived, "REPO", tmp_path)
    assert derived.differing(fresh, kept) == ["kept/a.md", "kept/b.json"]
    assert derived.differing(fresh, tmp_path / "new") == ["new: not committed (run derived.py without --check)"]
    folder = tmp_path / "run"
    folder.mkdir()
    with gzip.open(folder / "predictions.jsonl.gz", "wt") as f:
        for i, pred in enumerate([" 7", " 9"]):
            f.write(json.dumps({"model": "m", "config": "quest_1-4_plain", "task": "niah_single_1", "index": i,
                                "pred": pred, "outputs": ["7"]}) + "\n")
    run = {"model": "m", "method": "quest", "budget": "1-4", "source": "plain"}
    (folder / "summary.json").write_text(json.dumps({"runs": [
        {**run, "tasks": {"niah_single_1": 50.0}, "n": {"niah_single_1": 2}}]}))
    assert derived.rescore(folder) == (1, [])
    (folder / "summary.json").write_text(json.dumps({"runs": [
        {**run, "tasks": {"niah_single_1": 100.0}, "n": {"niah_single_1": 2}}]}))
    checked, bad = derived.rescore(folder)
    assert checked == 1 and bad == ["run: m quest_1-4_plain niah_single_1: summary 100.0, predictions 50.00 over 2"]
    (folder / "summary.json").write_text(json.dumps({"runs": []}))  # predictions with no cell to reproduce
    assert derived.rescore(folder) == (0, ["run: m quest_1-4_plain niah_single_1: 2 predictions, no summary cell"])
