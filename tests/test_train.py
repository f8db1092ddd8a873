"""The CPU trainer, run as users run it: `python -m ratplus_megatron.train --config ... overrides`.

Data: a small synthetic corpus tokenized with `python data_prep/tokenize.py` and the tiny tokenizer.
Covers: overfitting with the memory on (+ W&B offline run dir), kill + resume giving the same
per-step losses as an uninterrupted run, SIGTERM -> checkpoint + requeue marker + exit 0,
TP=2 through torchrun (with RAT+ joint dense/dilated training), a TP=2 run resumed at TP=1 and at
DP=2, one-line config and checkpoint errors.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

RECIPE = str(REPO / "configs" / "tiny_ratplus_cpu.yaml")


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    """A tiny synthetic corpus (4 short documents) that the tiny model can memorise, tokenized by
    the user-facing command."""
    from ratplus_megatron.data.synthetic_corpus import write_corpus

    root = tmp_path_factory.mktemp("train_data")
    write_corpus(str(root / "corpus.jsonl"), 4, seed=3, max_sentences=3, vocab_size=50)
    proc = subprocess.run([sys.executable, "data_prep/tokenize.py", "--input", str(root / "corpus.jsonl"),
                           "--tokenizer", "data_prep/assets/tiny-bpe", "--output-prefix", str(root / "tok" / "corpus")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(root / "tok" / "corpus_text_document")


def _train(args, *, timeout=300, check=True):
    proc = subprocess.run([sys.executable, "-m", "ratplus_megatron.train", "--config", RECIPE, *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _losses(metrics_file):
    """{iteration: loss} from a metrics file (a resumed run appends; the last record wins)."""
    out = {}
    for line in open(metrics_file):
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["iteration"]] = rec["loss"]
    return out


def _common(data_prefix, iters):
    return [f"data.prefixes=[{data_prefix}]", f"train.train_iters={iters}", "train.log_interval=1",
            "train.eval_interval=0", "batch.global_batch_size=4", "batch.micro_batch_size=2",
            "schedule.warmup_iters=3", "optimizer.lr=1e-2"]


def test_overfit_then_sigterm_resume_matches(tmp_path, data_prefix):
    iters = 30
    # the uninterrupted run: memory on, W&B offline; it must overfit the corpus
    full = tmp_path / "full"
    _train(_common(data_prefix, iters) + [f"checkpoint.save={full}", "wandb.mode=offline"])
    ref = _losses(full / "metrics.jsonl")
    assert sorted(ref) == list(range(1, iters + 1))
    assert ref[1] > 7.0 and ref[iters] < 0.6 * ref[1], ref
    runs = list((full / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir()), "no offline W&B run written"
    assert (full / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)

    # the same run killed by SIGTERM (Slurm's signal) after a few steps: checkpoint, marker, exit 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ratplus_megatron.train", "--config", RECIPE,
                             *_common(data_prefix, iters), f"checkpoint.save={run}", "checkpoint.save_interval=5"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "REQUEUE" in stdout and (run / "requeue_requested").is_file(), stdout[-2000:]
    killed_at = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= killed_at < iters and (run / f"iter_{killed_at:07d}" / "trainer_state.json").is_file()

    # resumed: continues to the end with exactly the uninterrupted run's per-step losses
    out = _train(_common(data_prefix, iters) + [f"checkpoint.save={run}", "checkpoint.save_interval=5"])
    assert f"(iteration {killed_at}," in out.stdout
    assert not (run / "requeue_requested").exists()
    resumed = _losses(run / "metrics.jsonl")
    assert sorted(resumed) == list(range(1, iters + 1))
    diffs = {i: abs(resumed[i] - ref[i]) for i in ref}
    assert max(diffs.values()) < 1e-6, diffs


def test_tp2_torchrun_joint_dilated(tmp_path, data_prefix):
    run = tmp_path / "tp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ratplus_megatron.train", "--config", RECIPE, *_common(data_prefix, 4),
           "parallel.tp=2", "joint_dilated.enabled=true", "joint_dilated.chunk=8", "joint_dilated.window=4",
           f"checkpoint.save={run}", "checkpoint.save_interval=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "tp 2 x pp 1 x dp 1" in proc.stdout
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4]
    assert all("loss_dilated" in r and r["loss"] > 0 for r in recs)
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"

    state = json.loads((run / "iter_0000004" / "trainer_state.json").read_text())
    assert state["layout"] == {"tp": 2, "pp": 1, "dp": 1} and state["optimizer_sharding"] == "torch_per_parameter"


def _torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "ratplus_megatron.train", "--config", RECIPE, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.usefixtures("megatron_single_process")
def test_resume_at_another_layout(tmp_path, data_prefix):
    """A TP=2 run stopped after 4 of 8 steps resumes at TP=1 and at TP=1 x DP=2: model and AdamW
    state reshard (the optimizer's moments are saved sharded like their parameters), and each
    resumed curve follows the uninterrupted TP=2 run."""
    import shutil

    common = _common(data_prefix, 8)
    _torchrun(common + ["parallel.tp=2", f"checkpoint.save={tmp_path / 'full'}"])
    ref = _losses(tmp_path / "full" / "metrics.jsonl")
    stop = tmp_path / "stop"
    _torchrun(common + ["parallel.tp=2", "train.exit_at_iter=4", f"checkpoint.save={stop}"])
    assert (stop / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    for name, run in (("tp1", lambda d: _train(common + [f"checkpoint.save={d}"])),
                      ("dp2", lambda d: _torchrun(common + ["parallel.tp=1", f"checkpoint.save={d}"]))):
        d = tmp_path / name
        shutil.copytree(stop, d)
        out = run(d).stdout
        assert "resumed from" in out and "written at layout {'tp': 2, 'pp': 1, 'dp': 1}, RNG not restored" in out
        resumed = _losses(d / "metrics.jsonl")
        assert sorted(resumed) == list(range(1, 9))
        rel = max(abs(resumed[i] / ref[i] - 1) for i in range(5, 9))
        assert rel < 1e-5, (name, rel, resumed, ref)
    # in this process, at TP=1: every parameter gets AdamW moments of step 4 back, not fresh zeros
    from ratplus_megatron.train import checkpoint as ckpt
    from ratplus_megatron.train.config import load_config
    from ratplus_megatron.train.loop import build_cpu

    cfg = load_config(RECIPE, common)
    models, optimizer, _ = build_cpu(cfg, cfg.model.build())
    ckpt.load(str(stop), 4, models, optimizer, megatron_optimizer=False, rank=0, layout={"tp": 1, "pp": 1, "dp": 1})
    params = list(models[0].parameters())
    assert len(optimizer.state) == len(params)
    for p in params:
        st = optimizer.state[p]
        assert float(st["step"]) == 4.0 and st["exp_avg"].shape == p.shape and float(st["exp_avg_sq"].sum()) > 0
    # weights only (init_from) from a training checkpoint: its optimizer tensors are not "ignored" weights
    assert ckpt.load_model_only(str(stop), models)["ignored_from_checkpoint"] == []

    # refusals, one line each: a CPU checkpoint from before the per-parameter format at another
    # layout; a CPU checkpoint on GPUs; on GPUs a dp_reshardable state (the default) at another TP / PP
    from ratplus_megatron.train import TrainConfigError

    state_file = stop / "iter_0000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    with pytest.raises(TrainConfigError, match="holds the CPU trainer's optimizer state"):
        ckpt.load(str(stop), 4, [], None, megatron_optimizer=True, rank=0, layout={"tp": 2, "pp": 1, "dp": 1})
    for fmt, gpu, msg in ((None, False, "keeps the torch optimizer in per-rank files"),
                          (None, True, r"holds the CPU trainer's optimizer state \(per-rank files\)"),
                          ("dp_reshardable", False, r"holds the GPU trainer's optimizer state \(dp_reshardable\)"),
                          ("dp_reshardable", True, "optimizer_sharding=fully_reshardable")):
        state_file.write_text(json.dumps({**state, "optimizer_sharding": fmt}))
        with pytest.raises(TrainConfigError, match=msg):
            ckpt.load(str(stop), 4, [], None, megatron_optimizer=gpu, rank=0, layout={"tp": 1, "pp": 1, "dp": 2})
    state_file.write_text(json.dumps({**state, "optimizer_sharding": None}))  # the legacy format, via the CLI
    proc = _train(common + [f"checkpoint.save={stop}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and "written at TP=2 PP=1 DP=1; this run is TP=1 PP=1 DP=1" in last
    assert not (stop / "iter_0000005").exists()


@pytest.mark.parametrize("override,expect", [
    ("optimizer.lrr=1", "unknown config key optimizer.'lrr'"),
    ("train.train_iters=many", "train.train_iters: expected an integer"),
    ("data.prefixes=[/nonexistent/x_text_document]", "not found"),
])
def test_bad_config_is_one_line_error(override, expect):
    proc = _train([override], check=False, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr


def test_wandb_without_the_package_is_one_line_error(tmp_path, data_prefix):
    """wandb.mode=offline/online where wandb is not installed (our GPU machine): the fix, not a traceback."""
    (tmp_path / "wandb.py").write_text("raise ImportError('No module named wandb')\n")  # shadows the real one
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "ratplus_megatron.train", "--config", RECIPE,
                           *_common(data_prefix, 4), f"checkpoint.save={tmp_path / 'run'}", "wandb.mode=offline"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("error: wandb.mode=offline needs the wandb package (pip install wandb); "
                    "or set wandb.mode=disabled"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_probe_needs_an_eval_interval():
    from ratplus_megatron.train.config import TrainConfigError, load_config

    with pytest.raises(TrainConfigError, match="train.probe and train.probes are evaluated at train.eval_interval"):
        load_config(None, ["train.probe=/some/x_sft", "train.train_iters=4"]).validate()
    with pytest.raises(TrainConfigError, match="train.probes are evaluated"):
        load_config(None, ["train.probes={copy: /some/x_sft}", "train.train_iters=4"]).validate()
    with pytest.raises(TrainConfigError, match="'val' must be an identifier"):
        load_config(None, ["train.probes={val: /x}", "train.train_iters=4", "train.eval_interval=2"]).validate()
    with pytest.raises(TrainConfigError, match="train.probes: expected a mapping"):
        load_config(None, ["train.probes=/x"])


@pytest.mark.parametrize("name", ["olmo2_7b_ratplus_10b", "olmo2_7b_attention_10b", "tiny_ratplus_cpu",
                                  "tiny_attention_cpu"])
def test_recipes_parse(name):
    from ratplus_megatron.train.config import load_config

    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
    model = cfg.model.build().validate(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    assert cfg.data.seq_length <= model.max_position_embeddings
    assert cfg.warmup_iters() < cfg.total_iters()
    if name.startswith("olmo2_7b"):
        assert cfg.tokens_per_iter() == 512 * 4096 and cfg.total_iters() == 4769
        assert model.memory.enabled == ("ratplus" in name)


def test_gate_stats_logged_and_equal_across_tp(tmp_path, data_prefix):
    """The metrics carry the memory gate's state (mean bias, mean sigmoid(bias), weight RMS), summed
    over TP shards: TP=2 reports what TP=1 does, and the identity start reads b = -6, W_g = 0."""
    args = [*_common(data_prefix, 3), "model.memory.gate_init=identity", "checkpoint.save_interval=0"]
    _train([*args, f"train.metrics_file={tmp_path / 'tp1.jsonl'}"])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ratplus_megatron.train", "--config", RECIPE, *args, "parallel.tp=2",
                           f"train.metrics_file={tmp_path / 'tp2.jsonl'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    tp1, tp2 = ([json.loads(x) for x in open(tmp_path / f"{n}.jsonl")] for n in ("tp1", "tp2"))
    first = tp1[0]
    assert abs(first["gate_bias_mean"] + 6) < 0.1 and abs(first["gate_open_mean"] - 0.00247) < 3e-4
    assert 0 < first["gate_weight_rms"] < 0.1  # W_g starts at 0; one step moves it by about lr
    for a, b in zip(tp1, tp2):
        for key in ("gate_bias_mean", "gate_open_mean", "gate_weight_rms"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (key, a[key], b[key])


def test_primed_torch_adam_steps_like_a_fresh_one():
    """checkpoint.prime_torch_adam (what lets megatron's optimizer without TE/apex build a load
    request before its first step) must not change Adam's math: a primed AdamW's first step equals
    a fresh one's, and its state_dict has the step megatron reads."""
    from types import SimpleNamespace

    import torch

    from ratplus_megatron.train.checkpoint import prime_torch_adam

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    primed = torch.optim.AdamW([{"params": twins[:1]}, {"params": twins[1:], "weight_decay": 0.0}], lr=1e-2)
    fresh = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-2)
    prime_torch_adam(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=primed)]))
    assert {s["step"].item() for s in primed.state_dict()["state"].values()} == {0.0}  # megatron asserts one step
    for opt, ps in ((fresh, params), (primed, twins)):
        for p in ps:
            p.grad = torch.ones_like(p) * 0.3
        opt.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [s["step"].item() for s in primed.state.values()] == [1.0, 1.0]
    before = {k: v.clone() for k, v in primed.state[twins[0]].items()}
    prime_torch_adam(SimpleNamespace(optimizer=primed))  # a stepped optimizer keeps its state
    assert all(torch.equal(before[k], primed.state[twins[0]][k]) for k in before)


def test_resumed_torch_adam_steps_are_unshared():
    """megatron-core's load gives every parameter of a torch Adam the same step tensor; Adam then
    counts each step once per parameter. After checkpoint._unshare_torch_adam_steps a resumed
    AdamW steps exactly like one that was never saved."""
    from types import SimpleNamespace

    import torch

    from ratplus_megatron.train.checkpoint import _unshare_torch_adam_steps

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    runs = [torch.optim.AdamW(ps, lr=1e-2, foreach=False) for ps in (params, twins)]
    for step in range(5):
        for opt, ps in zip(runs, (params, twins)):
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (step + 1))
            opt.step()
        if step == 1:  # "resume" the twin as megatron does: one step tensor for all
            shared = torch.tensor(2.0)
            for p in twins:
                runs[1].state[p]["step"] = shared
            _unshare_torch_adam_steps(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=runs[1])]))
    assert [runs[1].state[p]["step"].item() for p in twins] == [5.0, 5.0, 5.0]
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
