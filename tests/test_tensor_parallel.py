"""TP=2 and PP=2 (torchrun, gloo) against TP=1, memory on and off, through a TP=1 dist checkpoint.

The TP=1 model saves a megatron dist checkpoint; two torchrun ranks load it at TP=2 or PP=2
(resharding) and must reproduce the TP=1 logits and every parameter's gradient.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from ratplus_megatron.convert.mapping import hf_to_mcore
from reference_olmo2 import random_hf_weights
from tp_common import build, full_gradients, logits_and_grads, model_config

pytestmark = [pytest.mark.usefixtures("megatron_single_process"), pytest.mark.slow]

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=4, head_dim=16,
             ffn_hidden_size=96, vocab_size=128, max_position_embeddings=64, rope_theta=10000.0)


GQA = {**MODEL, "num_kv_heads": 2}  # two q heads per query group: each TP rank holds one whole group


@pytest.mark.parametrize("memory,tp,pp,sp,shape", [
    (dict(enabled=False), 2, 1, False, MODEL),
    (dict(enabled=True, gate_bias=True), 2, 1, False, MODEL),
    (dict(enabled=True, output_gate=True), 2, 1, False, MODEL),
    (dict(enabled=True, gate_bias=True), 1, 2, False, MODEL),
    (dict(enabled=True, gate_bias=True), 2, 1, True, MODEL),
    (dict(enabled=True, gate_bias=True, output_gate=True), 2, 1, True, GQA),
], ids=["attention-tp2", "memory-tp2", "memory+output-gate-tp2", "memory-pp2", "memory-tp2-sequence-parallel",
        "memory+output-gate-gqa-tp2-sequence-parallel"])
def test_parallel_matches_tp1_via_checkpoint(tmp_path, memory, tp, pp, sp, shape):
    """Gradients after megatron's TP gradient finalisation rule (q/k-norm and, with sequence
    parallelism, norm weights summed over TP) equal TP=1's. The memory's fused linear_qkv
    ([q, (og), k, v, g] per query group) and its gate bias reshard from TP=1 by whole groups."""
    model = prepare_case(tmp_path, memory, tp=tp, pp=pp, sp=sp, shape=shape)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(tp * pp), str(REPO / "tests" / "tp_worker.py"), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["logits_err"] < 1e-5, result
    assert set(result["grad_err"]) == {n for n, _ in model.named_parameters()}
    bad = {n: e for n, e in result["grad_err"].items() if e > 1e-5}
    assert not bad, bad


def prepare_case(tmp_path, memory, tp=2, pp=1, sp=False, shape=MODEL):
    """TP=1 model from random weights: its logits, gradients and a dist checkpoint, for the workers.

    The sequence is 21 tokens (odd) except under sequence parallelism, which splits it over TP."""
    from megatron.core import dist_checkpointing

    case = {"model": shape, "memory": memory, "tp": 1}
    cfg = model_config(case)
    model = build(case)
    model.load_state_dict(dict(hf_to_mcore(random_hf_weights(cfg, seed=5), cfg)), strict=False)
    gen = torch.Generator().manual_seed(6)
    seq = 22 if sp else 21
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=gen)
    proj = torch.randn(2, seq, cfg.vocab_size, generator=gen, dtype=torch.float64)
    logits = logits_and_grads(model, ids, proj)
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "ckpt"))
    torch.save({"ids": ids, "proj": proj, "logits": logits, "grads": full_gradients(model)},
               tmp_path / "ref.pt")
    (tmp_path / "case.json").write_text(json.dumps({**case, "tp": tp, "pp": pp, "sp": sp}))
    return model


def test_fused_gate_adds_no_collective_and_init_from_reshards(tmp_path):
    """TP=2 with sequence parallelism: the memory (gate rows in linear_qkv) makes exactly the
    all-gathers and reduce-scatters of plain attention, forward and backward (the separate gate
    linear gathered the sequence once more per layer). And an attention-only checkpoint saved at
    TP=1 initialises a memory model at TP=2: each rank's q/k/v rows load exactly, the gate rows and
    bias keep the identity init."""
    from megatron.core import dist_checkpointing

    from ratplus_megatron.config import preset
    from ratplus_megatron.model import build_model, to_transformer_config

    cfg = preset("tiny", **GQA)
    attention = build_model(cfg, to_transformer_config(cfg), use_te=False)
    (tmp_path / "attention_ckpt").mkdir()
    dist_checkpointing.save(attention.sharded_state_dict(), str(tmp_path / "attention_ckpt"))
    torch.save({n: p.detach() for n, p in attention.named_parameters()}, tmp_path / "attention.pt")
    variants = {"attention": dict(enabled=False), "memory": dict(enabled=True),
                "memory+gate-bias+output-gate": dict(enabled=True, gate_bias=True, output_gate=True)}
    (tmp_path / "case.json").write_text(json.dumps({
        "model": GQA, "seq": 22, "variants": variants,
        "init_from_memory": dict(enabled=True, gate_init="identity", output_gate=True)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(REPO / "tests" / "tp_fused_worker.py"), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())

    comm = result["comm"]
    layers = cfg.num_layers
    # per layer: linear_qkv's and linear_fc1's gathers of the sequence-parallel input; + the LM head's
    assert comm["attention"]["forward"].get("all_gather") == 2 * layers + 1, comm
    for name in variants:
        assert comm[name] == comm["attention"], comm

    init = result["init_from"]
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    assert init["report"]["fresh"] == [f"{qkv}[og/g rows]", "decoder.layers.self_attention.memory_gate_bias"]
    assert init["report"]["ignored_from_checkpoint"] == []
    assert init["errors"] == {"qkv": 0.0, "gate_rows": 0.0, "gate_bias": 0.0}, init
