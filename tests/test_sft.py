"""SFT mode: `python data_prep/tokenize.py --sft` and `python -m ratplus_megatron.train ... data.sft=true`.

Covers: the loss mask is exactly the answer tokens + EOS (prompt and padding masked); one-line
errors; the trainer's first SFT loss after `checkpoint.init_from` a pretraining run equals a
hand-computed masked cross-entropy of the pretrained weights (through the HF export), so the
fine-tune starts from the checkpoint with a fresh iteration counter; a stopped SFT run resumes
to the same per-step losses as an uninterrupted one; TP=2 and DP=2 (torchrun) start at the
single-process loss.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

TOK = "data_prep/assets/tiny-bpe"
RECIPE = str(REPO / "configs" / "tiny_ratplus_cpu.yaml")
LENGTH = 512


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def _run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """RULER train-split jsonl (two tasks, 4 samples each) and its --sft tokenization."""
    from transformers import AutoTokenizer

    from eval.ruler.generate import write_task_file

    root = tmp_path_factory.mktemp("sft")
    tok = AutoTokenizer.from_pretrained(str(REPO / TOK))
    for task in ("niah_single_1", "niah_multikey_2"):
        write_task_file(task, LENGTH, 4, tok, root / "ruler", split="train")
    src = root / "ruler" / "train" / str(LENGTH)
    proc = _run(["data_prep/tokenize.py", "--sft", "--input", str(src), "--tokenizer", TOK,
                 "--seq-length", str(LENGTH), "--output-prefix", str(root / "tok" / "niah")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "use data path" in proc.stdout
    rows = [json.loads(x) for f in sorted(src.glob("*.jsonl")) for x in f.read_text().splitlines()]
    return {"root": root, "prefix": str(root / "tok" / "niah_sft"), "rows": rows, "tok": tok, "src": src}


def test_mask_is_exactly_the_answer(sft_data):
    from ratplus_megatron.data.sft import SFTDataset

    tok, rows = sft_data["tok"], sft_data["rows"]
    by_prompt = {r["input"] + r["answer_prefix"]: r for r in rows}
    ds = SFTDataset([sft_data["prefix"]], LENGTH, "100,0,0", "train", num_samples=len(rows) * 2, seed=7)
    assert ds.n == len(rows) == 8
    seen = set()
    for i in range(len(rows)):
        item = ds[i]
        tokens, labels, mask = item["tokens"].numpy(), item["labels"].numpy(), item["loss_mask"].numpy()
        assert tokens.shape == labels.shape == mask.shape == (LENGTH,)
        assert (labels[:-1] == tokens[1:]).all()
        on = np.flatnonzero(mask)
        assert len(on) and (np.diff(on) == 1).all(), "the answer is one contiguous span"
        prompt_ids = tokens[: on[0] + 1].tolist()  # label at on[0] is the first answer token
        prompt = tok.decode(prompt_ids, skip_special_tokens=False)
        row = by_prompt[prompt]
        assert prompt_ids == tok(prompt, add_special_tokens=True)["input_ids"]
        answer = labels[on].tolist()
        assert answer[-1] == tok.eos_token_id
        assert tok.decode(answer[:-1]) == row["target"] == " " + ", ".join(row["outputs"])
        # everything after the answer is padding, masked
        assert (mask[on[-1] + 1:] == 0).all() and (tokens[on[-1] + 2:] == tok.pad_token_id).all()
        seen.add(prompt)
    assert len(seen) == len(rows), "one epoch visits every pair once"
    # epoch 2 is another permutation of the same pairs; the order is a function of the index only
    again = SFTDataset([sft_data["prefix"]], LENGTH, "100,0,0", "train", num_samples=len(rows) * 2, seed=7)
    assert all((again[i]["tokens"] == ds[i]["tokens"]).all() for i in range(len(rows), 2 * len(rows)))


def test_sft_errors_are_one_line(sft_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"outputs": ["1"]}) + "\n")
    cases = [
        (["--input", str(sft_data["src"])], "--sft needs --seq-length"),
        (["--input", str(bad), "--seq-length", "64"], "no 'input' text field"),
        (["--input", str(sft_data["src"]), "--seq-length", "64"], "no pair fits --seq-length 64"),
        (["--input", str(tmp_path / "missing.jsonl"), "--seq-length", "64"], "file not found"),
    ]
    for args, expect in cases:
        proc = _run(["data_prep/tokenize.py", "--sft", "--tokenizer", TOK, "--output-prefix",
                     str(tmp_path / "out" / "x"), *args], timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (args, proc.stderr)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _losses(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["iteration"]] = r["loss"]
    return out


COMMON = ["train.log_interval=1", "train.eval_interval=0", "wandb.mode=disabled", "model.max_position_embeddings=512",
          f"data.seq_length={LENGTH}", "batch.global_batch_size=4", "batch.micro_batch_size=2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A short pretraining run (memory model) on synthetic text: the fine-tunes' init_from."""
    from ratplus_megatron.data.synthetic_corpus import write_corpus

    tmp_path = tmp_path_factory.mktemp("pre")
    write_corpus(str(tmp_path / "corpus.jsonl"), 40, seed=5)
    proc = _run(["data_prep/tokenize.py", "--input", str(tmp_path / "corpus.jsonl"), "--tokenizer", TOK,
                 "--output-prefix", str(tmp_path / "tok" / "corpus"), "--workers", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    pre = tmp_path / "pre"
    proc = _run(["-m", "ratplus_megatron.train", "--config", RECIPE, *COMMON, "train.train_iters=6",
                 "schedule.warmup_iters=1", f"data.prefixes=[{tmp_path / 'tok' / 'corpus_text_document'}]",
                 f"checkpoint.save={pre}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return pre


def _sft_args(sft_data, pre):
    return COMMON + ["data.sft=true", f"data.prefixes=[{sft_data['prefix']}]", "data.split=100,0,0",
                     f"checkpoint.init_from={pre}", "train.train_iters=4", "optimizer.lr=1e-3",
                     "schedule.warmup_iters=1", "optimizer.weight_decay=0.0"]


@pytest.mark.slow
def test_finetune_from_checkpoint_loss_and_resume(sft_data, pretrained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import ratplus_megatron.hf  # noqa: F401
    from ratplus_megatron.data.sft import SFTDataset

    pre = pretrained
    # 2. SFT from it; 3. the same SFT stopped at step 2 and resumed
    sft = _sft_args(sft_data, pre)
    full, part = tmp_path / "sft_full", tmp_path / "sft_part"
    proc = _run(["-m", "ratplus_megatron.train", "--config", RECIPE, *sft, f"checkpoint.save={full}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"initialised from {pre}" in proc.stdout and "training from iteration 0 to 4" in proc.stdout
    for extra in (["train.exit_at_iter=2"], []):
        proc = _run(["-m", "ratplus_megatron.train", "--config", RECIPE, *sft, f"checkpoint.save={part}", *extra])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    ref, resumed = _losses(full / "metrics.jsonl"), _losses(part / "metrics.jsonl")
    assert sorted(ref) == [1, 2, 3, 4] and sorted(resumed) == [1, 2, 3, 4]
    for it in ref:
        assert abs(ref[it] - resumed[it]) < 1e-6, (it, ref, resumed)

    # 4. hand-computed masked CE of the pretrained weights on iteration 1's batch (2 micro-batches of 2)
    hf = tmp_path / "hf"
    proc = _run(["-m", "ratplus_megatron.convert", "mcore-to-hf", "--ckpt-dir", str(pre), "--out-dir", str(hf),
                 "--tokenizer", TOK])
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ds = SFTDataset([sft_data["prefix"]], LENGTH, "100,0,0", "train", num_samples=16, seed=1234)
    micro = []
    with torch.no_grad():
        for m in range(2):
            items = [ds[2 * m + j] for j in range(2)]
            tokens = torch.stack([x["tokens"] for x in items])
            labels = torch.stack([x["labels"] for x in items])
            mask = torch.stack([x["loss_mask"] for x in items])
            logits = model(input_ids=tokens).logits.float()
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   reduction="none").view_as(mask)
            assert 0 < mask.sum() < mask.numel() / 4, "only the answers count"
            micro.append(((ce * mask).sum() / mask.sum()).item())
    # the trainer reports the token mean over the step's micro-batches (sum / tokens)
    lm = [torch.stack([ds[2 * m + j]["loss_mask"] for j in range(2)]).sum().item() for m in range(2)]
    hand = sum(l * n for l, n in zip(micro, lm)) / sum(lm)
    assert abs(ref[1] - hand) < 2e-4, (ref[1], hand, micro)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 1])
def test_sft_two_ranks_same_first_loss(sft_data, pretrained, tmp_path, tp):
    """TP=2 and DP=2 (torchrun, gloo) fine-tunes start at the single-process run's loss."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = _sft_args(sft_data, pretrained) + ["train.train_iters=2", f"parallel.tp={tp}"]
    proc = _run(["-m", "ratplus_megatron.train", "--config", RECIPE, *args[:-1], f"checkpoint.save={one}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    proc = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ratplus_megatron.train",
                 "--config", RECIPE, *args, f"checkpoint.save={two}"], timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"tp {tp} x pp 1 x dp {2 // tp}" in proc.stdout
    a, b = _losses(one / "metrics.jsonl"), _losses(two / "metrics.jsonl")
    assert abs(a[1] - b[1]) < 1e-4, (a, b)
