"""HF <-> megatron conversion (python -m ratplus_megatron.convert), on CPU.

Round trips must reproduce every tensor bit for bit; the megatron model loaded from a converted
checkpoint must give the logits of the HF model loaded from the export (stock Olmo2ForCausalLM for the
plain model, our class through trust_remote_code for the memory model). A checkpoint saved at TP=2 in
the trainer's layout (torchrun, 2 CPU ranks; this file is also the worker) must export like TP=1.

Run as a torchrun worker: torchrun --nproc-per-node 2 tests/test_convert.py CKPT TRAINER_DIR
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
TOKENIZER = REPO / "data_prep" / "assets" / "tiny-bpe"

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, head_dim=16,  # GQA
            ffn_hidden_size=96, vocab_size=128, max_position_embeddings=64, rope_theta=10000.0)
TOKENS = {"bos_token_id": None, "eos_token_id": 3, "pad_token_id": 1}
MEMORY_CASES = {
    "plain": dict(enabled=False),
    "gate": dict(enabled=True),
    "gate+bias": dict(enabled=True, gate_bias=True),
    "output-gate": dict(enabled=True, output_gate=True),
}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def tiny_config(memory: dict):
    from ratplus_megatron.config import MemoryConfig, preset

    return preset("tiny", **TINY, memory=MemoryConfig(**memory))


def write_hf_dir(path: Path, cfg, weights: dict, shards: int = 1, tokenizer: bool = True, **config_overrides):
    """An HF OLMo2 directory: config.json, safetensors (sharded with an index when shards > 1), tokenizer."""
    from safetensors.torch import save_file

    from ratplus_megatron.convert.mapping import config_to_hf

    path.mkdir(parents=True)
    config = config_to_hf(cfg, TOKENS)
    config.update(architectures=["Olmo2MemoryForCausalLM" if cfg.memory.enabled else "Olmo2ForCausalLM"],
                  model_type="olmo2_memory" if cfg.memory.enabled else "olmo2", **config_overrides)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    names = list(weights)
    if shards == 1:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n].contiguous() for n in names[i::shards]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        for f in TOKENIZER.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
    return path


def read_hf_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def convert(*argv) -> int:
    from ratplus_megatron.convert.cli import main

    return main([*map(str, argv), "--quiet"])


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def megatron_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    from ratplus_megatron.convert.cli import load_megatron_checkpoint

    model = load_megatron_checkpoint(ckpt)[0].eval()
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None)


def token_ids(b=2, s=17, seed=0):
    return torch.randint(0, TINY["vocab_size"], (b, s), generator=torch.Generator().manual_seed(seed))


def random_weights(cfg, seed=1, dtype=torch.float32):
    from reference_olmo2 import random_hf_weights

    return {k: v.to(dtype) for k, v in random_hf_weights(cfg, seed=seed).items()}


# ------------------------------------------------------------------------------------------------
# round trips and logits
# ------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_round_trip_exact_and_logits_match_hf(tmp_path, case):
    cfg = tiny_config(MEMORY_CASES[case])
    weights = random_weights(cfg)
    hf = write_hf_dir(tmp_path / "hf", cfg, weights, shards=2 if case == "gate" else 1)
    assert convert("hf-to-mcore", "--hf-dir", hf, "--out-dir", tmp_path / "mc", "--dtype", "fp32", "--tp", "2") == 0
    meta = json.loads((tmp_path / "mc" / "ratplus_meta.json").read_text())
    assert meta["model"]["memory"]["enabled"] == cfg.memory.enabled and meta["dtype"] == "fp32"
    assert (tmp_path / "mc" / "tokenizer" / "tokenizer.json").exists()
    assert convert("mcore-to-hf", "--ckpt-dir", tmp_path / "mc", "--out-dir", tmp_path / "out",
                   "--max-shard-size", "100KB" if case == "plain" else "5GB") == 0
    out = tmp_path / "out"
    assert_same_tensors(read_hf_weights(out), weights)
    assert (out / "model.safetensors.index.json").exists() == (case == "plain")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == TOKENS["eos_token_id"]

    ids = token_ids()
    ours = megatron_logits(tmp_path / "mc", ids)
    if cfg.memory.enabled:
        from transformers import AutoModelForCausalLM

        config = json.loads((out / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_olmo2_memory.Olmo2MemoryForCausalLM"
        assert (config["memory_gate_bias"], config["memory_output_gate"]) == (cfg.memory.has_gate_bias,
                                                                               cfg.memory.output_gate)
        assert (out / "modeling_olmo2_memory.py").exists() and (out / "configuration_olmo2_memory.py").exists()
        hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert type(hf_model).__name__ == "Olmo2MemoryForCausalLM"
    else:
        from transformers import Olmo2ForCausalLM  # stock transformers, no remote code

        assert "auto_map" not in json.loads((out / "config.json").read_text())
        hf_model = Olmo2ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("megatron_single_process")
def test_bf16_round_trip_is_exact(tmp_path):
    cfg = tiny_config(MEMORY_CASES["gate+bias"])
    weights = random_weights(cfg, dtype=torch.bfloat16)
    hf = write_hf_dir(tmp_path / "hf", cfg, weights, tokenizer=False)
    assert convert("hf-to-mcore", "--hf-dir", hf, "--out-dir", tmp_path / "mc") == 0  # default dtype bf16
    assert convert("mcore-to-hf", "--ckpt-dir", tmp_path / "mc", "--out-dir", tmp_path / "out") == 0
    assert_same_tensors(read_hf_weights(tmp_path / "out"), weights)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert convert("mcore-to-hf", "--ckpt-dir", tmp_path / "mc", "--out-dir", tmp_path / "out32", "--dtype", "fp32") == 0
    assert_same_tensors(read_hf_weights(tmp_path / "out32"), {k: v.float() for k, v in weights.items()})


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("gate_init", ["ratplus", "identity"])
def test_adding_memory_initialises_the_gate(tmp_path, gate_init):
    plain = tiny_config(MEMORY_CASES["plain"])
    weights = random_weights(plain, seed=3)
    hf = write_hf_dir(tmp_path / "hf", plain, weights, tokenizer=False)
    assert convert("hf-to-mcore", "--hf-dir", hf, "--out-dir", tmp_path / "mc", "--dtype", "fp32",
                   "--memory", "--gate-init", gate_init) == 0
    assert convert("mcore-to-hf", "--ckpt-dir", tmp_path / "mc", "--out-dir", tmp_path / "out") == 0
    got = read_hf_weights(tmp_path / "out")
    gates = {k: got.pop(k) for k in list(got) if ".g_proj." in k}
    assert_same_tensors(got, weights)  # everything OLMo2 had is untouched
    kv = TINY["num_kv_heads"] * TINY["head_dim"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["memory"] is True and config["architectures"] == ["Olmo2MemoryForCausalLM"]
    if gate_init == "identity":  # W_g = 0, b = -6: g = 0.0025, k~ ~ k
        assert sorted(gates) == sorted(f"model.layers.{i}.self_attn.g_proj.{p}" for i in range(2)
                                       for p in ("weight", "bias"))
        for name, t in gates.items():
            assert torch.equal(t, torch.zeros(kv, TINY["hidden_size"]) if name.endswith("weight")
                               else torch.full((kv,), -6.0)), name
        assert config["memory_gate_bias"] is True
    else:  # W_g ~ N(0, 0.02), no bias: g ~ 0.5
        assert sorted(gates) == [f"model.layers.{i}.self_attn.g_proj.weight" for i in range(2)]
        w = torch.stack(list(gates.values()))
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
        assert not torch.equal(gates["model.layers.0.self_attn.g_proj.weight"],
                               gates["model.layers.1.self_attn.g_proj.weight"])
        assert config["memory_gate_bias"] is False


# ------------------------------------------------------------------------------------------------
# the command line as users type it
# ------------------------------------------------------------------------------------------------

def run_cli(*argv, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "ratplus_megatron.convert", *map(str, argv)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_command_line_round_trip_with_memory(tmp_path):
    plain = tiny_config(MEMORY_CASES["plain"])
    weights = random_weights(plain, seed=4)
    hf = write_hf_dir(tmp_path / "hf", plain, weights, shards=3)
    proc = run_cli("hf-to-mcore", "--hf-dir", hf, "--out-dir", tmp_path / "mc", "--memory",
                   "--gate-init", "identity", "--dtype", "fp32", "--tp", "2", "--pp", "2")
    assert "hf-to-mcore: 100%" in proc.stderr  # the progress bar
    assert not list(tmp_path.glob(".mc.tmp-*"))
    run_cli("mcore-to-hf", "--ckpt-dir", tmp_path / "mc", "--out-dir", tmp_path / "out", "--max-shard-size", "50KB")
    out = tmp_path / "out"
    got = read_hf_weights(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert_same_tensors({k: v for k, v in got.items() if ".g_proj." not in k}, weights)
    assert (out / "tokenizer.json").read_bytes() == (TOKENIZER / "tokenizer.json").read_bytes()

    err = run_cli("hf-to-mcore", "--hf-dir", hf, "--out-dir", tmp_path / "mc3", "--tp", "3", check=False)
    assert err.returncode == 2
    assert err.stderr.strip().splitlines()[-1] == \
        "error: tensor parallel size 3 does not divide num_attention_heads=4"
    assert not (tmp_path / "mc3").exists()


def test_help_explains_layout_free_checkpoints(capsys):
    from ratplus_megatron.convert.cli import main

    with pytest.raises(SystemExit):
        main(["hf-to-mcore", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "loads it at any TP/PP" in text and "--tp/--pp only check" in text


# ------------------------------------------------------------------------------------------------
# a checkpoint saved at TP=2 in the trainer's layout
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("megatron_single_process")
def test_tp2_trainer_checkpoint_exports_like_tp1(tmp_path):
    cfg = tiny_config(MEMORY_CASES["gate+bias"])
    weights = random_weights(cfg, seed=5)
    hf = write_hf_dir(tmp_path / "hf", cfg, weights, tokenizer=False)
    assert convert("hf-to-mcore", "--hf-dir", hf, "--out-dir", tmp_path / "mc", "--dtype", "fp32") == 0
    assert convert("mcore-to-hf", "--ckpt-dir", tmp_path / "mc", "--out-dir", tmp_path / "tp1") == 0

    trainer, prefixed = tmp_path / "trainer", tmp_path / "prefixed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(tmp_path / "mc"), str(trainer), str(prefixed)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (trainer / "latest_checkpointed_iteration.txt").read_text().strip() == "7"

    # the trainer's layout: model config from iter_0000007/trainer_state.json, no ratplus_meta.json
    assert convert("mcore-to-hf", "--ckpt-dir", trainer, "--out-dir", tmp_path / "tp2") == 0
    assert_same_tensors(read_hf_weights(tmp_path / "tp2"), read_hf_weights(tmp_path / "tp1"))
    assert_same_tensors(read_hf_weights(tmp_path / "tp2"), weights)
    assert json.loads((tmp_path / "tp2" / "config.json").read_text())["memory_gate_bias"] is True
    # model tensors under a key prefix, no tracker file (highest iter_*), config from --config
    assert convert("mcore-to-hf", "--ckpt-dir", prefixed, "--out-dir", tmp_path / "pre") == 2
    assert convert("mcore-to-hf", "--ckpt-dir", prefixed, "--out-dir", tmp_path / "pre",
                   "--config", tmp_path / "mc" / "ratplus_meta.json") == 0
    assert_same_tensors(read_hf_weights(tmp_path / "pre"), weights)


def tp_worker(ckpt: Path, trainer: Path, prefixed: Path) -> None:
    """Load the TP=1 checkpoint at TP=2 and save it twice. ``trainer``: like ratplus_megatron.train
    ({"model": ..., "optimizer": ...} in iter_0000007/, trainer_state.json with the model config, the
    tracker file; an unfinished iter_0000009/). ``prefixed``: the model under the key prefix 'model.'
    in iter_0000003/, no tracker, no config. Both hold an optimizer-like tensor whose key also ends in
    the embedding's."""
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)
    from megatron.core import dist_checkpointing

    from ratplus_megatron.convert.cli import model_config_from_dict
    from ratplus_megatron.model import build_model, to_transformer_config
    from ratplus_megatron.parallel import init_parallel

    # dist_checkpointing.save keeps one multiprocessing Manager per process, spawned by default (which
    # re-imports this file and torch); a forked one costs nothing and is all a test needs.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.get_write_results_queue("fork")

    cfg = model_config_from_dict(json.loads((ckpt / "ratplus_meta.json").read_text())["model"])
    rank, _ = init_parallel(tp=2, pp=1)
    model = build_model(cfg, to_transformer_config(cfg, tp=2, perform_initialization=False), use_te=False)
    missing, unexpected = model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(ckpt)),
                                                strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

    def save(path: Path, prefix: str):
        sharded = model.sharded_state_dict(prefix=prefix)
        emb = sharded[prefix + "embedding.word_embeddings.weight"]
        decoy = dataclasses.replace(emb, key="optimizer.state.exp_avg." + emb.key, data=torch.ones_like(emb.data))
        if rank == 0:
            path.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save({"model": sharded, "optimizer": {"exp_avg": decoy}, "iteration": 7}, str(path))
        torch.distributed.barrier()

    save(trainer / "iter_0000007", "")
    save(prefixed / "iter_0000003", "model.")
    if rank == 0:
        (trainer / "iter_0000009").mkdir()  # an unfinished save: the tracker file wins
        section = {"preset": "tiny", "use_te": None, "memory": dataclasses.asdict(cfg.memory),
                   **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "memory"}}
        (trainer / "iter_0000007" / "trainer_state.json").write_text(
            json.dumps({"iteration": 7, "config": {"model": section}}))
        (trainer / "latest_checkpointed_iteration.txt").write_text("7\n")
        (prefixed / "iter_0000001").mkdir()  # older, and no checkpoint in it


# ------------------------------------------------------------------------------------------------
# the real OLMo2-7B config, on the meta device
# ------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("memory", [False, True], ids=["plain", "memory"])
def test_olmo2_7b_config_converts_to_the_right_shapes(memory):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from ratplus_megatron.config import MemoryConfig
    from ratplus_megatron.convert.cli import _build_model
    from ratplus_megatron.convert.mapping import config_from_hf, hf_shapes, hf_to_mcore, mcore_to_hf

    hf_config = json.loads((DATA / "olmo2-7b-config.json").read_text())
    cfg = config_from_hf(hf_config)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.ffn_hidden_size, cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta,
            cfg.rms_norm_eps) == (32, 4096, 32, 32, 128, 11008, 100352, 4096, 500000.0, 1e-6)
    for tp in (1, 2, 4, 8, 16, 32):
        cfg.validate(tp=tp, pp=4)
    shapes = hf_shapes(cfg)
    with torch.device("meta"):  # the stock HF model agrees with our list of HF tensors
        stock = Olmo2ForCausalLM(Olmo2Config(**{k: v for k, v in hf_config.items() if k != "architectures"}))
    assert {n: tuple(p.shape) for n, p in stock.named_parameters()} == shapes
    assert sum(map(lambda s: torch.Size(s).numel(), shapes.values())) == cfg.num_parameters()
    if memory:
        cfg = dataclasses.replace(cfg, memory=MemoryConfig(enabled=True, gate_bias=True))
        shapes = hf_shapes(cfg)
        assert shapes["model.layers.31.self_attn.g_proj.weight"] == (4096, 4096)
    with torch.device("meta"):
        model = _build_model(cfg, torch.bfloat16)
        hf = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in shapes.items()}
        mc = dict(hf_to_mcore(hf, cfg))
    want = {n: tuple(t.shape) for n, t in model.state_dict().items() if not n.endswith("_extra_state")}
    assert {n: tuple(t.shape) for n, t in mc.items()} == want
    # q, k, v (+ the memory gate's rows, fused into the same projection)
    assert want["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 if memory else 3) * 4096, 4096)
    assert ("decoder.layers.0.self_attention.memory_gate_bias" in want) == memory
    assert want["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 11008, 4096)
    assert {n: tuple(t.shape) for n, t in mcore_to_hf(mc, cfg)} == shapes


# ------------------------------------------------------------------------------------------------
# one-line errors
# ------------------------------------------------------------------------------------------------

def _break(kind: str, hf: Path):
    if kind == "no-config":
        (hf / "config.json").unlink()
    elif kind == "no-weights":
        (hf / "model.safetensors").unlink()
    elif kind == "missing-shard":
        index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind in ("missing-tensor", "wrong-shape"):
        from safetensors.torch import load_file, save_file

        w = load_file(str(hf / "model.safetensors"))
        if kind == "missing-tensor":
            del w["model.layers.1.mlp.up_proj.weight"]
        else:
            w["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
        save_file(w, str(hf / "model.safetensors"))
    elif kind == "architecture":
        c = json.loads((hf / "config.json").read_text())
        c.update(architectures=["LlamaForCausalLM"], model_type="llama")
        (hf / "config.json").write_text(json.dumps(c))


ERRORS = {
    "no-config": (), "no-weights": (), "missing-shard": (), "missing-tensor": (), "wrong-shape": (),
    "architecture": (), "tp": ("--tp", "3"), "tp-kv-heads": ("--tp", "4"), "pp": ("--pp", "3"),
    "gate-init": ("--gate-init", "identity"),
}
MESSAGES = {
    "no-config": "missing {hf}/config.json",
    "no-weights": "no safetensors weights in {hf}: expected model.safetensors or model.safetensors.index.json",
    "missing-shard": "missing weight file {hf}/model-00001-of-00002.safetensors (listed in model.safetensors.index.json)",
    "missing-tensor": "tensor model.layers.1.mlp.up_proj.weight is missing from the HF checkpoint",
    "wrong-shape": "tensor model.layers.0.self_attn.k_proj.weight has shape [48, 64], expected [32, 64] from config.json",
    "architecture": "unsupported architecture ['LlamaForCausalLM']: expected one of ['Olmo2ForCausalLM', "
                    "'Olmo2MemoryForCausalLM']",
    "tp": "tensor parallel size 3 does not divide num_attention_heads=4",
    "tp-kv-heads": "tensor parallel size 4 does not divide num_kv_heads=2 (the full-width k-norm and the memory "
                   "gate shard by kv heads)",
    "pp": "pipeline parallel size 3 does not divide num_layers=2",
    "gate-init": "--gate-init only applies together with --memory (adding the memory gate)",
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_hf_to_mcore_errors_are_one_line(tmp_path, capsys, kind):
    cfg = tiny_config(MEMORY_CASES["plain"])
    hf = write_hf_dir(tmp_path / "hf", cfg, random_weights(cfg), tokenizer=False)
    _break(kind, hf)
    assert convert("hf-to-mcore", "--hf-dir", hf, "--out-dir", tmp_path / "mc", *ERRORS[kind]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: " + MESSAGES[kind].format(hf=hf)]
    assert not (tmp_path / "mc").exists() and not list(tmp_path.glob(".mc.tmp-*"))


def test_mcore_to_hf_errors_are_one_line(tmp_path, capsys):
    cases = [
        (("--ckpt-dir", tmp_path / "nope"), f"checkpoint directory {tmp_path / 'nope'} does not exist"),
        (("--ckpt-dir", tmp_path), f"no megatron checkpoint in {tmp_path}: expected metadata.json, "
                                   "latest_checkpointed_iteration.txt or iter_*/"),
        (("--ckpt-dir", tmp_path, "--max-shard-size", "lots"),
         "--max-shard-size 'lots': expected a size such as 5GB, 500MB or 2GiB"),
    ]
    for argv, message in cases:
        assert convert("mcore-to-hf", *argv, "--out-dir", tmp_path / "out") == 2
        assert capsys.readouterr().err.strip().splitlines() == ["error: " + message]
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12")
    assert convert("mcore-to-hf", "--ckpt-dir", tmp_path, "--out-dir", tmp_path / "out") == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}/latest_checkpointed_iteration.txt names "
                                               f"iter_0000012, but {tmp_path}/iter_0000012 holds no dist "
                                               "checkpoint (metadata.json)")


@pytest.mark.usefixtures("megatron_single_process")
def test_checkpoint_that_does_not_match_its_config_is_one_line_error(tmp_path, capsys):
    cfg = tiny_config(MEMORY_CASES["plain"])
    hf = write_hf_dir(tmp_path / "hf", cfg, random_weights(cfg), tokenizer=False)
    assert convert("hf-to-mcore", "--hf-dir", hf, "--out-dir", tmp_path / "mc", "--dtype", "fp32") == 0
    meta = json.loads((tmp_path / "mc" / "ratplus_meta.json").read_text())
    cases = [({"ffn_hidden_size": 64}, "Global shape mismatch for loaded (torch.Size([2, 192, 64])) and expected "
                                       "((2, 128, 64)) tensor for key decoder.layers.mlp.linear_fc1.weight"),
             ({"memory": {**meta["model"]["memory"], "enabled": True}},
              "has linear_qkv rows [q, k, v] per query group, the model config (memory=True, output gate=False) "
              "expects [q, k, v, g]: the config does not match")]
    capsys.readouterr()
    for i, (change, message) in enumerate(cases):
        (tmp_path / f"meta{i}.json").write_text(json.dumps({**meta, "model": {**meta["model"], **change}}))
        assert convert("mcore-to-hf", "--ckpt-dir", tmp_path / "mc", "--out-dir", tmp_path / "out",
                       "--config", tmp_path / f"meta{i}.json") == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # megatron chats
        assert len(err) == 1 and err[0].startswith(f"error: checkpoint {tmp_path / 'mc'} ") and message in err[0], err
        assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("megatron_single_process")
def test_checkpoint_with_the_old_separate_gate_is_one_line_error(tmp_path, capsys):
    """A memory checkpoint written before the gate's rows moved into linear_qkv (its own
    `linear_gate`) is refused with the way to re-import it, not loaded with a fresh gate."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from ratplus_megatron.config import MemoryConfig
    from ratplus_megatron.convert.cli import _build_model

    cfg = tiny_config(MEMORY_CASES["plain"])
    old = _build_model(cfg, torch.float32).sharded_state_dict()  # an old layout's qkv: [q, k, v]
    gate = torch.zeros(cfg.num_layers, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
    old["gate"] = ShardedTensor.from_rank_offsets("decoder.layers.self_attention.linear_gate.weight", gate)
    (tmp_path / "mc").mkdir()
    dist_checkpointing.save(old, str(tmp_path / "mc"))
    mem = dataclasses.replace(cfg, memory=MemoryConfig(enabled=True))
    (tmp_path / "mc" / "ratplus_meta.json").write_text(json.dumps(
        {"format": "ratplus-megatron-checkpoint", "version": 1, "model": dataclasses.asdict(mem)}))
    capsys.readouterr()
    assert convert("mcore-to-hf", "--ckpt-dir", tmp_path / "mc", "--out-dir", tmp_path / "out") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "decoder.layers.self_attention.linear_gate.weight: it was written before the " \
        "memory gate's rows moved into linear_qkv" in err[0] and "commit 7d2edbb" in err[0], err
    assert not (tmp_path / "out").exists()


def test_parse_size():
    from ratplus_megatron.convert.cli import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100kb") == 10**5
    assert parse_size("1234") == 1234


def test_prefix_detection():
    from ratplus_megatron.convert.cli import ConvertError, detect_prefix

    assert detect_prefix(["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]) == ""
    assert detect_prefix(["optimizer.state.exp_avg.model.embedding.word_embeddings.weight",
                          "model.embedding.word_embeddings.weight"]) == "model."
    with pytest.raises(ConvertError, match="not an OLMo2 megatron checkpoint"):
        detect_prefix(["decoder.final_layernorm.weight", "xembedding.word_embeddings.weight"])


if __name__ == "__main__":  # torchrun worker of test_tp2_trainer_checkpoint_exports_like_tp1
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    tp_worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
