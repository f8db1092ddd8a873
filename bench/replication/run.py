"""Issue #9 at small scale: attention vs memory under Quest, MoBA, SnapKV and random budgets.

    python bench/replication/run.py STAGE[,STAGE...] [--work DIR] [--size full|toy] [--deadline S]

Stages (each resumable and skipped when done; see bench/replication/README.md for the GPU calls):

  prep      offline corpora -> indexed datasets (retrieval documents, synthetic text, essays, copy
            documents), the RULER NIAH train split -> SFT sequences (answer-only loss mask), the
            RULER test split, the held-out probes
  pretrain  both models (attention.yaml, memory.yaml), concurrently, one per GPU: first short_iters
            steps at short_length tokens per sequence (runs/KIND-short; 3000 x 512 in the recipe,
            --set short_length=0 skips it), then the recipe at 4096 from those weights
  sft       both models: fine-tune on the NIAH train split from their pretrained checkpoints
  convert   both SFT checkpoints -> Hugging Face (mcore-to-hf)
  eval      eval/niah.py: 8 tasks x (dense + quest, moba, snapkv, random at 1/4..1/32), attention
            model on plain K/V, memory model on K~/V~ (mem; with --memory-plain also on K/V); a queue of
            (model, source, task, methods) jobs, --procs-per-gpu workers on each GPU
  collect   scores -> WORK/report and bench/results/replication/ (summary.json, summary.md,
            accuracy_vs_budget.png when matplotlib is there, run.json with training numbers,
            predictions.jsonl.gz with every generation)
  all       every stage in order

The models are those the evaluation combos name (`size["combos"]`): `--set 'combos=[[memory, mem]]'`
trains, converts and evaluates the memory model alone, one GPU's work. `--set 'seeds=[1234, 1235]'`
trains each of them once per seed (the recipe's seed keeps the plain name, others are KIND-sSEED
in runs/, hf/ and the report); collect then also writes seeds.md / seeds.json (each cell's average
per seed, mean, min, max; the kinds against each other) and seeds.png (per sparse method, each
kind's mean and its band). `--trainers-per-gpu N` runs N trainers at a time on each GPU.

--deadline S: stop starting work after S seconds from the start of this command and stop a running
trainer (SIGTERM: it saves a checkpoint) or eval workers (their finished samples are kept), so one
call stays inside a 10-minute limit; the next call continues. Exit status 3 means "not finished,
call again"; 0 means the stages asked for are complete.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _p in (REPO, REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
from _runs import environment, trainer_command, write_json  # noqa: E402  (bench/_runs.py)

HERE = Path(__file__).resolve().parent
TOKENIZER = "data_prep/assets/tiny-bpe"
KINDS = ("attention", "memory")
CORPORA = ("retrieval", "synthetic", "essays", "copy")  # the pretraining blend's order
STAGES = ("prep", "pretrain", "sft", "convert", "eval", "collect")
NOT_FINISHED = 3

# Sizes. "full" is the GPU recipe (estimates in README.md); "toy" is the CPU smoke test.
SIZES = {
    "full": dict(
        length=4096, retrieval_docs=36000, synthetic_docs=3000, copy_docs=20000, retrieval_chars=7500,
        drill_weight=6.0, blend=(0.6, 0.13, 0.02, 0.25),
        # 3000 steps at 512 tokens first: at 4096 from step 0 no model learned to retrieve (README, runs 2-3)
        short_length=512, short_iters=3000, short_lr=3e-3, short_min_lr=3e-4, sft_pairs_per_task=250, test_samples=100, tasks="all",
        sft_iters=125, sft_batch=32, sft_micro=4, sft_lr=3e-4, sft_min_lr=3e-5, sft_warmup=10,
        combos=(("attention", "plain"), ("memory", "mem")), probe_interval=250, probe_docs=256,
        methods="dense,quest,quest+int8,moba,snapkv,random", budgets="1/4,1/8,1/16,1/32", moba_block=64,
        max_new_tokens=48, eval_batch=16, dtype="bf16", overrides=[],
        seeds=(),  # training seeds per model; () = the recipe's own (train.seed), see models()
    ),
    "toy": dict(
        length=512, retrieval_docs=24, synthetic_docs=24, copy_docs=24, retrieval_chars=1200, drill_weight=6.0,
        blend=(0.7, 0.15, 0.15, 0.0), short_length=0, short_iters=0, short_lr=0.0, short_min_lr=0.0, sft_pairs_per_task=6, test_samples=2, tasks="niah_single_1",
        sft_iters=3, sft_batch=2, sft_micro=1, sft_lr=1e-4, sft_min_lr=1e-5, sft_warmup=1,
        combos=(("attention", "plain"), ("memory", "mem"), ("memory", "plain")), probe_interval=2, probe_docs=16,
        methods="dense,quest,quest+int8,moba,snapkv,random", budgets="1/4", moba_block=16,
        max_new_tokens=8, eval_batch=2, dtype="fp32", seeds=(),
        overrides=["model.preset=tiny", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                   "model.num_kv_heads=4", "model.head_dim=16", "model.ffn_hidden_size=128",
                   "model.max_position_embeddings=512", "data.seq_length=512", "precision.bf16=false",
                   "batch.micro_batch_size=1", "batch.global_batch_size=2", "train.train_tokens=null",
                   "train.train_iters=4", "schedule.warmup_iters=1", "train.log_interval=1",
                   "checkpoint.save_interval=2"],
    ),
}
# "smoke": the toy pipeline in bf16, to try every stage on a GPU in a minute before the full run.
SIZES["smoke"] = dict(SIZES["toy"], dtype="bf16",
                      overrides=[o for o in SIZES["toy"]["overrides"] if o != "precision.bf16=false"])


def sft_overrides(size: dict, work: Path, name: str) -> list[str]:
    """The SFT recipe: the pretraining YAML plus these (RAT+: SFT on the NIAH train split, answers
    comma-joined). `name`: the model's runs/ name (its kind, or KIND-sSEED: models())."""
    return ["data.sft=true", f"data.prefixes=[{work / 'data' / 'sft_sft'}]", "data.weights=null",
            "data.split=98,2,0", f"checkpoint.init_from={work / 'runs' / (name + '-pretrain')}",
            f"checkpoint.save={work / 'runs' / (name + '-sft')}", "train.train_tokens=null",
            f"train.train_iters={size['sft_iters']}", f"batch.global_batch_size={size['sft_batch']}",
            f"batch.micro_batch_size={size['sft_micro']}", f"optimizer.lr={size['sft_lr']}",
            f"optimizer.min_lr={size['sft_min_lr']}", f"schedule.warmup_iters={size['sft_warmup']}",
            "optimizer.weight_decay=0.0", f"checkpoint.save_interval={max(size['sft_iters'] // 2, 1)}"]


def log(msg: str) -> None:
    print(f"[replication {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    def __init__(self, deadline: float | None):
        self.t0 = time.time()
        self.deadline = deadline

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - (time.time() - self.t0)


def cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def env_for(gpu: int | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (env.get("PYTHONPATH", ""), str(REPO)) if x)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    else:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---------------------------------------------------------------------------------------------- prep

_W: dict = {}


def _init_worker(kind_args):
    from transformers import AutoTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W["tok"] = AutoTokenizer.from_pretrained(str(REPO / TOKENIZER))
    _W["args"] = kind_args


def _encode_docs(job):
    """(kind, start, count) -> (uint16 ids with EOS per document, lengths)."""
    import numpy as np

    kind, start, count = job
    a = _W["args"]
    if kind == "retrieval":
        if "gen" not in _W:
            from ratplus_megatron.data.retrieval_corpus import RetrievalDocs, essay_sentences

            _W["gen"] = RetrievalDocs(seed=a["seed"], target_chars=a["retrieval_chars"],
                                      filler_sentences=essay_sentences(), drill_weight=a["drill_weight"])
        docs = _W["gen"].documents(start, count)
    elif kind == "copy":
        from ratplus_megatron.data.copy_corpus import copy_document
        from ratplus_megatron.data.synthetic_corpus import make_word_list

        words = _W.setdefault("words", make_word_list(3000, seed=1000 + a["seed"]))
        docs = [copy_document(i, a["seed"], words) for i in range(start, start + count)]
    elif kind == "synthetic":
        from ratplus_megatron.data.synthetic_corpus import iter_documents

        docs = list(iter_documents(count, seed=10_000 + start, min_sentences=20, max_sentences=120))
    else:  # essays: one document per essay file
        from eval.ruler.haystacks import essay_dir

        files = sorted(p for p in essay_dir().iterdir() if p.suffix == ".txt")[start:start + count]
        docs = [p.read_text(encoding="utf-8") for p in files]
    tok = _W["tok"]
    if not docs:
        return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64)
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    flat = np.fromiter((t for x in ids for t in x + [eos]), dtype=np.uint16, count=int(lengths.sum()))
    return flat, lengths


def write_indexed(prefix: Path, jobs, pool) -> dict:
    """Write PREFIX_text_document.{bin,idx} (temporaries renamed at the end)."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    final = str(prefix) + "_text_document"
    tmp_bin, tmp_idx = final + ".bin.tmp", final + ".idx.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=np.uint16)
    docs = tokens = 0
    for flat, lengths in pool.imap(_encode_docs, jobs):
        off = 0
        for n in lengths.tolist():
            builder.add_document(flat[off:off + n], [n])
            off += n
        docs += len(lengths)
        tokens += int(lengths.sum())
    builder.finalize(tmp_idx)
    os.replace(tmp_bin, final + ".bin")
    os.replace(tmp_idx, final + ".idx")
    info = {"documents": docs, "tokens": tokens}
    Path(final + ".json").write_text(json.dumps(info) + "\n")
    return info


def _ruler_job(job):
    from transformers import AutoTokenizer

    from eval.ruler.generate import write_task_file

    task, length, n, out, split = job
    tok = AutoTokenizer.from_pretrained(str(REPO / TOKENIZER))
    return str(write_task_file(task, length, n, tok, out, split=split, skip_existing=True))


def stage_prep(work: Path, size: dict, clock: Clock, workers: int) -> bool:
    import multiprocessing as mp

    from eval.ruler.tasks import resolve_tasks

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    chunk = 50
    plan = {
        "retrieval": [("retrieval", s, min(chunk, size["retrieval_docs"] - s)) for s in range(0, size["retrieval_docs"], chunk)],
        "synthetic": [("synthetic", s, min(chunk, size["synthetic_docs"] - s)) for s in range(0, size["synthetic_docs"], chunk)],
        "copy": [("copy", s, min(chunk * 4, size["copy_docs"] - s)) for s in range(0, size["copy_docs"], chunk * 4)],
        "essays": [("essays", s, 10) for s in range(0, 60, 10)],
    }
    ctx = mp.get_context("fork")
    args = {"seed": 0, "retrieval_chars": size["retrieval_chars"], "drill_weight": size["drill_weight"]}
    todo = [k for k in plan if not (data / f"{k}_text_document.idx").is_file()]
    if todo:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(args,)) as pool:
            for k in todo:
                t = time.time()
                info = write_indexed(data / k, plan[k], pool)
                log(f"prep: {k}: {info['documents']} documents, {info['tokens'] / 1e6:.2f}M tokens in {time.time() - t:.0f} s")
    tasks = [t.name for t in resolve_tasks(size["tasks"])]
    L = size["length"]
    jobs = [(t, L, size["sft_pairs_per_task"], str(work / "ruler"), "train") for t in tasks]
    jobs += [(t, L, size["test_samples"], str(work / "ruler"), "test") for t in tasks]
    t = time.time()
    with ctx.Pool(min(workers, len(jobs))) as pool:
        for path in pool.imap_unordered(_ruler_job, jobs):
            pass
    log(f"prep: RULER train ({size['sft_pairs_per_task']}/task) and test ({size['test_samples']}/task) splits "
        f"at {L} in {time.time() - t:.0f} s")
    from ratplus_megatron.data.sft import build_sft_dataset

    if not (data / "probe_sft.tokens.npy").is_file():
        # the recall probe: held-out retrieval documents (indices past the corpus) cut before their last answer
        from ratplus_megatron.data.retrieval_corpus import RetrievalDocs, essay_sentences

        gen = RetrievalDocs(seed=0, target_chars=size["retrieval_chars"], filler_sentences=essay_sentences())
        make_probe(work, "probe", (gen.probe_row(10**7 + i) for i in range(size["probe_docs"])), L,
                   "recall probe", "retrieval")
    if not (data / "copy_sft.tokens.npy").is_file():
        # the copy probe: held-out copy documents cut inside their last stretch (copying alone predicts the rest)
        from ratplus_megatron.data.copy_corpus import copy_probe_row
        from ratplus_megatron.data.synthetic_corpus import make_word_list

        words = make_word_list(3000, seed=1000)  # the copy corpus's (seed 0)
        rows = (copy_probe_row(10**7 + i, 0, words) for i in range(4 * size["probe_docs"]))
        make_probe(work, "copy", [r for r in rows if r][:size["probe_docs"]], L, "copy probe", "copy")
    if not (data / "sft_sft.tokens.npy").is_file():
        s = build_sft_dataset(str(work / "ruler" / "train" / str(L)), str(REPO / TOKENIZER), str(data / "sft"), L)
        log(f"prep: SFT: {s['pairs']} pairs ({s['dropped_too_long']} too long), answers {s['answer_tokens_mean']:.1f} "
            f"tokens on average (max {s['answer_tokens_max']})")
    return True


# ---------------------------------------------------------------------------------------------- training

def latest(run: Path) -> int:
    try:
        return int((run / "latest_checkpointed_iteration.txt").read_text().strip())
    except (OSError, ValueError):
        return 0


def recipe(kind: str) -> str:
    return str(HERE / f"{kind}.yaml")


def total_iters(kind: str, overrides: list[str]) -> int:
    from ratplus_megatron.train.config import load_config

    return load_config(recipe(kind), overrides).total_iters()


def write_probe_rows(work: Path, name: str, rows) -> None:
    path = work / "probe" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def make_probe(work: Path, name: str, rows, length: int, what: str, corpus: str) -> None:
    """WORK/probe/NAME.jsonl from held-out documents, and its SFT rows at the recipe's length
    (WORK/data/NAME_sft); probe_at rebuilds them at other lengths."""
    from ratplus_megatron.data.sft import build_sft_dataset

    write_probe_rows(work, name, rows)
    s = build_sft_dataset(str(work / "probe" / f"{name}.jsonl"), str(REPO / TOKENIZER), str(work / "data" / name), length)
    log(f"prep: {what}: {s['pairs']} held-out {corpus} documents ({s['dropped_too_long']} too long)")


_UNFIT: set = set()  # (probe, length) pairs already found too short, said once


def probe_at(work: Path, seq: int, name: str = "probe") -> str | None:
    """A probe's documents (`name`: probe = recall, copy) as SFT rows of `seq` tokens (built once;
    rows that do not fit are dropped; None when none fits): a trainer at another sequence length
    than the recipe's needs its own."""
    from ratplus_megatron.data.sft import NothingFitsError, SFTError, build_sft_dataset

    prefix = work / "data" / f"{name}{seq}"
    if not Path(str(prefix) + "_sft.tokens.npy").is_file():
        try:
            s = build_sft_dataset(str(work / "probe" / f"{name}.jsonl"), str(REPO / TOKENIZER), str(prefix), seq)
        except NothingFitsError:
            if (name, seq) not in _UNFIT:
                log(f"{name} probe at {seq}: no document fits; not logged")
                _UNFIT.add((name, seq))
            return None
        except SFTError as e:
            raise SystemExit(f"{name} probe at {seq} tokens: {e}") from None
        log(f"{name} probe at {seq}: {s['pairs']} documents ({s['dropped_too_long']} too long)")
    return f"{prefix}_sft"


def probe_overrides(work: Path, seq: int | None = None) -> list[str]:
    """The trainer's probes, at the recipe's length (None) or rebuilt at `seq` tokens (a probe
    none of whose documents fits is left out)."""
    if seq is None:
        recall, copy = (str(work / "data" / f"{n}_sft") for n in ("probe", "copy"))
    else:
        recall, copy = (probe_at(work, seq, n) for n in ("probe", "copy"))
    return [f"train.probe={recall or 'null'}", f"train.probes={{{f'copy: {copy}' if copy else ''}}}"]


def short_overrides(size: dict, work: Path, kind: str, name: str | None = None) -> list[str]:
    """The optional first phase: the pretraining recipe at size["short_length"] tokens per sequence
    for size["short_iters"] steps, with as many tokens per step, rounded down (a copying circuit forms sooner in
    short contexts: README, "Context length delays copying"); pretraining then starts from it.
    `name`: the model's runs/ name (default: kind)."""
    from ratplus_megatron.train.config import load_config

    name = name or kind
    L, S = size["length"], size["short_length"]
    b = load_config(recipe(kind), list(size["overrides"])).batch
    return pretrain_overrides(size, work, kind, short=False, name=name) + [
        f"data.seq_length={S}", f"batch.global_batch_size={b.global_batch_size * L // S}",
        f"batch.micro_batch_size={b.micro_batch_size * L // S}", "train.train_tokens=null",
        f"train.train_iters={size['short_iters']}", *probe_overrides(work, S),
        *([f"optimizer.lr={size['short_lr']}"] if size["short_lr"] else []),
        *([f"optimizer.min_lr={size['short_min_lr']}"] if size["short_min_lr"] else []),
        f"checkpoint.save={work / 'runs' / (name + '-short')}"]


def pretrain_overrides(size: dict, work: Path, kind: str, short: bool = True, name: str | None = None) -> list[str]:
    name = name or kind
    d = work / "data"
    parts = [(k, w) for k, w in zip(CORPORA, size["blend"]) if w > 0]  # a zero weight leaves its corpus out
    prefixes = ",".join(str(d / f"{k}_text_document") for k, _ in parts)
    weights = ",".join(str(w) for _, w in parts)
    # the probes: answer-only loss on held-out retrieval documents (recall) and copy documents
    return [f"data.prefixes=[{prefixes}]", f"data.weights=[{weights}]",
            f"checkpoint.save={work / 'runs' / (name + '-pretrain')}", *probe_overrides(work),
            f"train.eval_interval={size['probe_interval']}", "train.eval_iters=2",
            *([f"checkpoint.init_from={work / 'runs' / (name + '-short')}"] if short and size["short_length"] else []),
            *size["overrides"]]


def kinds(size: dict) -> tuple[str, ...]:
    """The models the evaluation combos name: `--set combos=[[memory,mem]]` trains, converts and
    evaluates the memory model alone (one GPU's worth of work)."""
    return tuple(k for k in KINDS if any(m == k for m, _ in size["combos"]))


def models(size: dict) -> list[tuple[str, str, int | None]]:
    """(name, kind, seed) of every model to train: each kind the combos name, once per seed in
    size["seeds"] (empty: the recipe's own train.seed). A model at its recipe's seed is named by its
    kind (runs/KIND-PHASE, hf/KIND, the report's model column); another seed is KIND-sSEED (seed None
    means: leave the recipe's seed alone)."""
    from ratplus_megatron.train.config import load_config

    out = []
    for kind in kinds(size):
        own = load_config(recipe(kind), list(size["overrides"])).train.seed
        for seed in size["seeds"] or (own,):
            out.append((kind, kind, None) if seed == own else (f"{kind}-s{seed}", kind, seed))
    return out


def model_kind(name: str) -> str:
    """The kind of a model name that models() gives (KIND or KIND-sSEED)."""
    return re.sub(r"-s\d+$", "", name)


def run_trainers(work: Path, size: dict, clock: Clock, phase: str, per_gpu: int = 1) -> bool:
    """Train the models, `per_gpu` at a time on each GPU (one at a time on CPU). True when all
    reached their last iteration."""
    gpus = cuda_count()
    pending = []
    for name, kind, seed in models(size):
        ov = phase_overrides(size, work, kind, phase, name, seed)
        run = work / "runs" / f"{name}-{phase}"
        if latest(run) >= total_iters(kind, ov):
            log(f"{phase}: {name} already done ({latest(run)} iterations)")
            continue
        pending.append((name, kind, run, ov))
    free = [g for _ in range(per_gpu) for g in range(gpus)] if gpus else [None]  # GPUs filled in turn
    running: list = []
    while pending or running:
        while pending and free:
            name, kind, run, ov = pending.pop(0)
            gpu = free.pop(0)
            run.mkdir(parents=True, exist_ok=True)
            out = open(run / f"{phase}.log", "a")
            cmd = trainer_command(recipe(kind), ov, nproc=1)
            log(f"{phase}: {name} on {'GPU ' + str(gpu) if gpu is not None else 'CPU'} (log {run / (phase + '.log')})")
            running.append((name, subprocess.Popen(cmd, cwd=REPO, env=env_for(gpu), stdout=out, stderr=subprocess.STDOUT),
                            out, run, gpu))
        time.sleep(1)
        for item in list(running):
            name, proc, out, run, gpu = item
            if proc.poll() is not None:
                running.remove(item)
                out.close()
                free.append(gpu)
                if proc.returncode != 0:
                    tail = (run / f"{phase}.log").read_text()[-3000:]
                    raise SystemExit(f"{phase}: {name} failed (exit {proc.returncode}); log tail:\n{tail}")
                log(f"{phase}: {name} stopped at iteration {latest(run)}")
        if clock.left() < 45 and running:
            log(f"{phase}: deadline: asking the trainers to checkpoint and stop (SIGTERM)")
            for _, proc, _, _, _ in running:
                proc.send_signal(signal.SIGTERM)
            for name, proc, out, run, _ in running:
                proc.wait()
                out.close()
                log(f"{phase}: {name} saved at iteration {latest(run)}")
            return False
    return all(latest(work / "runs" / f"{name}-{phase}") >= total_iters(kind, phase_overrides(size, work, kind, phase, name, seed))
               for name, kind, seed in models(size))


def phase_overrides(size: dict, work: Path, kind: str, phase: str, name: str | None = None,
                    seed: int | None = None) -> list[str]:
    """The trainer overrides of one model's phase; `name` its runs/ name (default: kind), `seed`
    its train.seed when not the recipe's (last, so that it wins)."""
    name = name or kind
    if phase == "short":
        ov = short_overrides(size, work, kind, name)
    elif phase == "pretrain":
        ov = pretrain_overrides(size, work, kind, name=name)
    else:
        ov = list(size["overrides"]) + sft_overrides(size, work, name)
    return ov + ([f"train.seed={seed}"] if seed is not None else [])


def stage_convert(work: Path, size: dict, clock: Clock) -> bool:
    for name, _, _ in models(size):
        out = work / "hf" / name
        if (out / "config.json").is_file():
            continue
        cmd = [sys.executable, "-m", "ratplus_megatron.convert", "mcore-to-hf", "--ckpt-dir",
               str(work / "runs" / f"{name}-sft"), "--out-dir", str(out), "--tokenizer", str(REPO / TOKENIZER)]
        subprocess.run(cmd, cwd=REPO, env=env_for(None if not cuda_count() else 0), check=True)
        log(f"convert: {name} -> {out}")
    return True


# ---------------------------------------------------------------------------------------------- eval

def eval_jobs(work: Path, size: dict) -> list[tuple[str, str, str, str]]:
    """(model name, K/V source, task, methods) jobs: each method but dense (one spec, added to quest) is
    a job of its own, so that the workers finish together (per-task jobs ran 150-350 s on the H200)."""
    from eval.ruler.tasks import resolve_tasks

    tasks = [t.name for t in resolve_tasks(size["tasks"])]
    methods = size["methods"].split(",")
    groups = [m for m in methods if m != "dense"] or ["dense"]
    if "dense" in methods and groups != ["dense"]:
        groups[0] = "dense," + groups[0]
    names = [name for name, _, _ in models(size)]
    return [(name, s, t, g) for g in groups for m, s in size["combos"] for name in names if model_kind(name) == m
            for t in tasks]


def n_specs(size: dict, methods: str) -> int:
    return sum(1 if m == "dense" else len(size["budgets"].split(",")) for m in methods.split(","))


def job_dir(work: Path, job) -> Path:
    model, source, task, methods = job
    return work / "niah" / f"{model}-{source}-{task}-{methods.replace(',', '+')}"


def pred_files(work: Path, size: dict, job) -> list[str]:
    """The job's prediction files, one per method spec: pred/LENGTH/CONFIG/TASK.jsonl."""
    return glob.glob(str(job_dir(work, job) / "pred" / str(size["length"]) / "*" / f"{job[2]}.jsonl"))


def job_done(work: Path, size: dict, job) -> bool:
    from eval.report import read_jsonl

    files = pred_files(work, size, job)
    return len(files) == n_specs(size, job[3]) and all(len(read_jsonl(f)) >= size["test_samples"] for f in files)


def stage_eval(work: Path, size: dict, clock: Clock, procs_per_gpu: int) -> bool:
    L = size["length"]
    jobs = [j for j in eval_jobs(work, size) if not job_done(work, size, j)]
    gpus = cuda_count()
    slots = [g for g in range(gpus) for _ in range(procs_per_gpu)] if gpus else [None]
    free = list(slots)
    running = []
    log(f"eval: {len(jobs)} (model, K/V source, task, methods) jobs to run on {len(slots)} worker slot(s)")
    while jobs or running:
        while jobs and free and clock.left() > 90:
            job = jobs.pop(0)
            slot = free.pop(0)
            d = job_dir(work, job)
            data = d / "data" / str(L)
            data.mkdir(parents=True, exist_ok=True)
            src = work / "ruler" / "data" / str(L) / f"{job[2]}.jsonl"
            if not (data / src.name).is_file():
                shutil.copyfile(src, data / src.name)
            cmd = [sys.executable, "eval/niah.py", "--model", str(work / "hf" / job[0]), "--tasks", job[2],
                   "--lengths", str(L), "--methods", job[3], "--budgets", size["budgets"],
                   "--samples", str(size["test_samples"]), "--kv-source", job[1], "--out", str(d),
                   "--batch-size", str(size["eval_batch"]), "--max-new-tokens", str(size["max_new_tokens"]),
                   "--moba-block", str(size["moba_block"]), "--dtype", size["dtype"]]
            if slot is None:
                cmd += ["--device", "cpu"]
            out = open(d / "niah.log", "a")
            running.append((job, slot, subprocess.Popen(cmd, cwd=REPO, env=env_for(slot), stdout=out,
                                                         stderr=subprocess.STDOUT), out))
        time.sleep(1)
        for item in list(running):
            job, slot, proc, out = item
            if proc.poll() is None:
                continue
            running.remove(item)
            out.close()
            free.append(slot)
            if proc.returncode != 0:
                tail = (job_dir(work, job) / "niah.log").read_text()[-2000:]
                raise SystemExit(f"eval: {'/'.join(job)} failed (exit {proc.returncode}); log tail:\n{tail}")
            log(f"eval: {'/'.join(job)} done")
        if clock.left() < 30 and running:
            log("eval: deadline: stopping the workers (finished samples are kept)")
            for _, _, proc, _ in running:
                proc.terminate()
            for _, _, proc, out in running:
                proc.wait()
                out.close()
            return False
        if jobs and not running and clock.left() <= 90:
            return False
    return all(job_done(work, size, j) for j in eval_jobs(work, size))


# ---------------------------------------------------------------------------------------------- collect

def _train_numbers(run: Path) -> dict:
    recs = []
    try:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except OSError:
        pass
    train = [r for r in recs if r.get("kind") == "train"]
    if not train:
        return {}
    last = train[-1]
    tps = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
    evals = [r for r in recs if r.get("kind") == "eval"]
    return {"iterations": last["iteration"], "final_loss": last["loss"], "first_logged_loss": train[0]["loss"],
            "tokens_per_s_median": sorted(tps)[len(tps) // 2], "memory_gib": last.get("memory_gib"),
            "train_seconds": sum(r["seconds"] for r in train),
            "evals": [{k: r[k] for k in ("iteration", "val_loss", "probe_loss", "copy_loss") if k in r} for r in evals]}


def stage_collect(work: Path, size: dict, results: Path) -> bool:
    from eval.report import write_reports

    outs = [job_dir(work, j) for j in eval_jobs(work, size)]
    labels = [j[0] for j in eval_jobs(work, size)]
    present = [(o, lab) for o, lab in zip(outs, labels) if o.is_dir()]
    report = work / "report"
    summary = write_reports([o for o, _ in present], [lab for _, lab in present], dest=report,
                            extra={"issue": 9, "length": size["length"], "samples": size["test_samples"]})
    results.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "summary.md", "accuracy_vs_budget.png"):
        if (report / name).is_file():
            shutil.copyfile(report / name, results / name)
    info = {**environment(), "size": size,  # device, versions, commit (COMMIT wins), command
            "training": {f"{k}-{p}": _train_numbers(work / "runs" / f"{k}-{p}") for k, _, _ in models(size)
                         for p in ("short", "pretrain", "sft") if (work / "runs" / f"{k}-{p}").is_dir()},
            "data": {k: json.loads((work / "data" / f"{k}_text_document.json").read_text())
                     for k in CORPORA
                     if (work / "data" / f"{k}_text_document.json").is_file()},
            "sft_data": json.loads((work / "data" / "sft_sft.json").read_text())
            if (work / "data" / "sft_sft.json").is_file() else None}
    write_json(results / "run.json", info)
    n_pred = write_predictions(work, size, results / "predictions.jsonl.gz")
    spread = seed_spread(summary["runs"], {name: kind for name, kind, _ in models(size)})
    write_spread(results, "seeds", spread, "per seed", "seeds")
    log(f"collect: {len(summary['runs'])} table rows, {n_pred} predictions -> {results}"
        + (" (+ seeds.md)" if spread else ""))
    return True


def write_predictions(work: Path, size: dict, dest: Path) -> int:
    """Every generation of the eval jobs in one gzipped jsonl (model, config, task, index, pred,
    outputs, new_tokens; sorted), so that rescoring and retention.py need no GPU."""
    import gzip

    from eval.report import run_predictions  # one record per sample, as the report scores them
    from ratplus_megatron.files import write_atomic

    rows = []
    for job in eval_jobs(work, size):
        for f in pred_files(work, size, job):
            config = Path(f).parent
            rows += [{"model": job[0], "config": config.name, "task": job[2], "index": r["index"], "pred": r["pred"],
                      "outputs": r["outputs"], "new_tokens": r.get("new_tokens")}
                     for r in run_predictions(config).get(job[2], {}).values()]
    rows.sort(key=lambda r: (r["model"], r["config"], r["task"], r["index"]))

    def write(f):
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write("".join(json.dumps(r) + "\n" for r in rows).encode())

    write_atomic(dest, write, binary=True)
    return len(rows)


def seed_spread(runs: list[dict], kind_of: dict[str, str]) -> list[dict]:
    """Per (kind, method, budget, K/V source) with 2+ models of that kind (kind_of: model name ->
    kind; other models are left out): each model's average and their mean, min and max (empty
    when no kind has two models)."""
    from eval.report import _method_rank

    cells: dict = {}
    for r in runs:
        if r["model"] in kind_of:
            key = (kind_of[r["model"]], _method_rank(r["method"]), -r["budget_value"], r["method"], r["budget"], r["source"])
            cells.setdefault(key, {})[r["model"]] = r["average"]
    out = []
    for (kind, _, _, method, budget, source), by in sorted(cells.items()):
        if len(by) >= 2:
            v = list(by.values())
            out.append({"kind": kind, "method": method, "budget": budget, "source": source, "averages": by,
                        "mean": round(sum(v) / len(v), 2), "min": min(v), "max": max(v)})
    return out


def kind_contrasts(spread: list[dict]) -> list[dict]:
    """Per method and budget, for each two kinds with 2+ models: the difference of their means
    (later kind minus earlier), whether every model of one kind lies above every model of the
    other, and an exact two-sided permutation p over the models (every split of the pooled
    averages into groups of the two sizes). The models are the unit here: with 2 + 2 no split can
    give p below 1/3, with 4 + 3 below 2/35."""
    from itertools import combinations
    from math import comb

    cells: dict = {}
    for c in spread:
        cells.setdefault((c["method"], c["budget"]), []).append(c)
    out = []
    for (method, budget), cs in cells.items():
        cs = sorted(cs, key=lambda c: (c["kind"], c["source"]))
        for i, a in enumerate(cs):
            for b in cs[i + 1:]:
                if a["kind"] == b["kind"]:
                    continue
                xa, xb = list(a["averages"].values()), list(b["averages"].values())
                pooled, nb = xa + xb, len(xb)
                diff = sum(xb) / nb - sum(xa) / len(xa)
                total = sum(pooled)
                extreme = 0
                for pick in combinations(range(len(pooled)), nb):
                    sb = sum(pooled[j] for j in pick)
                    d = sb / nb - (total - sb) / len(xa)
                    extreme += abs(d) >= abs(diff) - 1e-9
                out.append({"method": method, "budget": budget, "a": f"{a['kind']} ({a['source']})",
                            "b": f"{b['kind']} ({b['source']})", "models": [len(xa), nb],
                            "difference": round(diff, 2), "separated": min(xb) > max(xa) or max(xb) < min(xa),
                            "p": round(extreme / comb(len(pooled), nb), 4)})
    return out


def seeds_table(spread: list[dict], contrasts: list[dict], title: str = "per seed", count: str = "seeds") -> str:
    lines = [f"# Average over the tasks, {title} (string_match_all, x100)", "",
             f"| model | method | budget | K/V | {count} | mean | min | max | per model |", "|---|---|---|---|---|---|---|---|---|"]
    for c in spread:
        per = ", ".join(f"{m} {a:.1f}" for m, a in c["averages"].items())
        lines.append(f"| {c['kind']} | {c['method']} | {c['budget']} | {c['source']} | {len(c['averages'])} | "
                     f"{c['mean']:.1f} | {c['min']:.1f} | {c['max']:.1f} | {per} |")
    if contrasts:
        lines += ["", "## Between kinds", "",
                  f"B - A: the difference of the kinds' means; separated: every one of B's {count} above (or "
                  f"below) every one of A's; p: exact two-sided permutation test over the {count} (with two of "
                  "each kind p cannot go below 1/3).", "",
                  f"| method | budget | A | B | {count} A, B | B - A | separated | p |", "|---|---|---|---|---|---|---|---|"]
        for c in contrasts:
            lines.append(f"| {c['method']} | {c['budget']} | {c['a']} | {c['b']} | {c['models'][0]}, {c['models'][1]} | "
                         f"{c['difference']:+.1f} | {'yes' if c['separated'] else 'no'} | {c['p']:.3f} |")
    return "\n".join(lines) + "\n"


def write_spread(dest: Path, stem: str, spread: list[dict], title: str, count: str) -> list[dict]:
    """DEST/STEM.json (the spread, and the contrasts between kinds), STEM.md and STEM.png (when
    matplotlib is there); with no spread, removes an earlier one's files (they would describe
    other models). Returns the contrasts."""
    from ratplus_megatron.files import write_atomic

    files = [dest / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    if not spread:
        for f in files:
            f.unlink(missing_ok=True)
        return []
    contrasts = kind_contrasts(spread)
    write_json(files[0], {"cells": spread, "contrasts": contrasts}, quiet=True)
    write_atomic(files[1], lambda f: f.write(seeds_table(spread, contrasts, title, count)))
    files[2].unlink(missing_ok=True)  # no plot when only dense cells spread
    try:
        spread_plot(spread, files[2], count)
    except ImportError:  # no matplotlib on the GPU machine: the table is enough
        pass
    return contrasts


def spread_plot(spread: list[dict], path: Path, what: str = "models") -> None:
    """One panel per sparse method: each kind's mean over its models against the budget, the band
    between its lowest and highest model, each model thin; the kind's dense mean and range as a
    dashed line and a band. Needs matplotlib (ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.report import _method_rank, budget_value
    from ratplus_megatron.files import write_atomic

    methods = sorted({c["method"] for c in spread if c["method"] != "dense"}, key=_method_rank)
    kinds = sorted({(c["kind"], c["source"]) for c in spread})
    if not methods:
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(max(6.0, 4.6 * len(methods)), 4.4), squeeze=False,
                             sharey=True)
    for ax, method in zip(axes[0], methods):
        for i, (kind, source) in enumerate(kinds):
            color = f"C{i}"
            for c in spread:  # dense: one band across the panel
                if (c["kind"], c["source"], c["method"]) == (kind, source, "dense"):
                    ax.axhline(c["mean"], color=color, ls="--", lw=1)
                    ax.axhspan(c["min"], c["max"], color=color, alpha=0.08)
            cells = sorted(((budget_value(c["budget"], length=1), c) for c in spread
                            if (c["kind"], c["source"], c["method"]) == (kind, source, method)), key=lambda bc: bc[0])
            if not cells:
                continue
            x = [b for b, _ in cells]
            n = len(cells[0][1]["averages"])
            ax.plot(x, [c["mean"] for _, c in cells], marker="o", color=color, lw=2,
                    label=f"{kind} ({source}), {n} {what}")
            ax.fill_between(x, [c["min"] for _, c in cells], [c["max"] for _, c in cells], color=color, alpha=0.2)
            for model in cells[0][1]["averages"]:
                ax.plot(x, [c["averages"].get(model) for _, c in cells], color=color, lw=0.7, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (fraction of context)")
        ax.set_title(method)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("NIAH accuracy (avg over tasks)")
    fig.suptitle(f"Per kind: the mean over its {what} (line), lowest to highest (band), each one (thin);\n"
                 "dense: dashed line and band", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"), binary=True)
    plt.close(fig)


def replot(results: Path) -> None:
    """accuracy_vs_budget.png from a summary.json, and seeds.png from a seeds.json (e.g. on a machine
    with matplotlib, after the GPU run)."""
    from eval.report import plot

    runs = json.loads((results / "summary.json").read_text())["runs"]
    plot(runs, results / "accuracy_vs_budget.png")
    log(f"plot: {results / 'accuracy_vs_budget.png'}")
    if (results / "seeds.json").is_file():
        spread_plot(json.loads((results / "seeds.json").read_text())["cells"], results / "seeds.png", "seeds")
        log(f"plot: {results / 'seeds.png'}")


# ---------------------------------------------------------------------------------------------- main

def _is_combo(c) -> bool:
    """(model, K/V source) as eval/niah.py takes the source: its own parser decides."""
    from eval.engine.spec import SpecError, parse_kv_source

    if not (isinstance(c, tuple) and len(c) == 2 and c[0] in KINDS and isinstance(c[1], str)):
        return False
    try:
        parse_kv_source(c[1])
    except SpecError:
        return False
    return True


def apply_sets(size: dict, sets: list[str]) -> dict:
    """size with --set KEY=VALUE applied (VALUE parsed as YAML, lists become tuples like the defaults)."""
    import yaml

    size = dict(size)
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or key not in size or key == "overrides":
            known = ", ".join(sorted(k for k in size if k != "overrides"))
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {known} (trainer settings go to --train-set)")
        value = yaml.safe_load(raw)
        if isinstance(size[key], tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(size[key], (int, float)) and not isinstance(size[key], bool):
            if isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{item!r}: {key} takes a number")
            if isinstance(size[key], float):
                value = float(value)
        if key == "blend" and (not isinstance(value, tuple) or not 3 <= len(value) <= len(CORPORA)
                               or min(value) < 0 or sum(value) <= 0):
            raise ValueError(f"{item!r}: blend takes 3-{len(CORPORA)} weights >= 0 ({', '.join(CORPORA)}), "
                             "not all zero")
        if key == "seeds" and not (isinstance(value, tuple) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   and x >= 0 for x in value)
                                   and len(set(value)) == len(value)):
            raise ValueError(f"{item!r}: seeds takes a list of distinct integers >= 0, e.g. [1234, 1235]")
        if key == "combos" and not (value and all(_is_combo(c) for c in value)):
            raise ValueError(f"{item!r}: combos takes [MODEL, SOURCE] pairs, MODEL one of {', '.join(KINDS)}, "
                             "SOURCE an eval/niah.py --kv-source (mem, plain, selection=...,compute=...)")
        size[key] = value
    return size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/replication/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("stages", help="comma-separated: " + ", ".join(STAGES) + ", all, or replot")
    p.add_argument("--work", default=os.environ.get("REPLICATION_WORK", "/tmp/replication"),
                   help="working folder (data, checkpoints, HF exports, predictions); default /tmp/replication")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--deadline", type=float, default=None, help="seconds this call may use (e.g. 560)")
    p.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                   help="CPU processes for prep")
    p.add_argument("--procs-per-gpu", type=int, default=max(1, min(14, (os.cpu_count() or 2) // max(1, cuda_count()) - 2)),
                   help="eval worker processes per GPU (default: the CPU cores per GPU less 2, at most 14)")
    p.add_argument("--memory-plain", action="store_true",
                   help="also evaluate the memory model with selection and attention on its plain K/V")
    p.add_argument("--results", default=str(REPO / "bench" / "results" / "replication"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one field of the size's recipe (e.g. drill_weight=0, blend=[0.6,0.13,0.02,0.25]: retrieval, synthetic, essays, copy); "
                        "YAML values; recorded in run.json")
    p.add_argument("--trainers-per-gpu", type=int, default=1,
                   help="trainers run together on each GPU (small models leave a GPU mostly idle; default 1)")
    p.add_argument("--train-set", action="append", default=[], metavar="OVERRIDE",
                   help="extra trainer override for pretraining and SFT (e.g. optimizer.lr=2e-3, model.num_layers=6)")
    a = p.parse_args(argv)
    names = [s.strip() for s in a.stages.split(",") if s.strip()]
    if names == ["all"]:
        names = list(STAGES)
    if names == ["replot"]:
        replot(Path(a.results))
        return 0
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        print(f"error: unknown stage(s) {', '.join(bad) or '(none)'}; known: {', '.join(STAGES)}, all, replot",
              file=sys.stderr)
        return 2
    if a.trainers_per_gpu < 1:
        print(f"error: --trainers-per-gpu must be at least 1, got {a.trainers_per_gpu}", file=sys.stderr)
        return 2
    work = Path(a.work).resolve()
    size = dict(SIZES[a.size])
    try:
        size = apply_sets(size, a.set)
    except ValueError as e:
        print(f"error: --set: {e}", file=sys.stderr)
        return 2
    size["overrides"] = [*size["overrides"], *a.train_set]
    if a.memory_plain and ("memory", "plain") not in size["combos"]:
        size["combos"] = (*size["combos"], ("memory", "plain"))
    clock = Clock(a.deadline)
    os.chdir(REPO)
    for stage in names:
        t = time.time()
        if stage == "prep":
            ok = stage_prep(work, size, clock, a.workers)
        elif stage == "pretrain":
            ok = (not size["short_length"] or run_trainers(work, size, clock, "short", a.trainers_per_gpu)) and \
                run_trainers(work, size, clock, "pretrain", a.trainers_per_gpu)
        elif stage == "sft":
            ok = run_trainers(work, size, clock, stage, a.trainers_per_gpu)
        elif stage == "convert":
            ok = stage_convert(work, size, clock)
        elif stage == "eval":
            ok = stage_eval(work, size, clock, a.procs_per_gpu)
        else:
            ok = stage_collect(work, size, Path(a.results))
        log(f"stage {stage}: {'done' if ok else 'NOT finished (call again)'} in {time.time() - t:.0f} s")
        if not ok:
            return NOT_FINISHED
    return 0


if __name__ == "__main__":
    sys.exit(main())
