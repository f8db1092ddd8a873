"""The NIAH inference engine (eval/engine) and CLI (eval/niah.py) on tiny random models, CPU.

Tiny configs built in code, the tiny BPE tokenizer of data_prep/assets; nothing is downloaded.
"""
import itertools
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Olmo2Config, Olmo2ForCausalLM

import kernels.sparse as ks
from eval.engine import Engine, KVSource, MethodSpec, SpecError, parse_budget, parse_kv_source
from eval.engine.select import moba_select, quest_select, snapkv_keep
from ratplus_megatron.hf import Olmo2MemoryConfig, Olmo2MemoryForCausalLM
from tiny_models import init_unit_scale_

REPO = Path(__file__).resolve().parents[1]
TINY_BPE = REPO / "data_prep" / "assets" / "tiny-bpe"
TINY = dict(vocab_size=2048, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=None,
            eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
NEW = 4


def make_model(kind, seed=0, **overrides):
    """A tiny model with O(1) activations and spread-out logits (default init would hide mistakes)."""
    torch.manual_seed(seed)
    cfg = {**TINY, **overrides}
    if kind == "memory":
        model = Olmo2MemoryForCausalLM(Olmo2MemoryConfig(**cfg))
    else:
        model = Olmo2ForCausalLM(Olmo2Config(**cfg))
    init_unit_scale_(model)
    return model.eval()


@pytest.fixture(scope="module", params=["attention", "memory"])
def engine(request):
    return Engine(make_model(request.param), eos_token_ids=[])


@pytest.fixture(scope="module")
def attn_engine():
    """The attention model alone, for engine tests whose logic does not depend on the K/V source."""
    return Engine(make_model("attention"), eos_token_ids=[])


def prompts(lengths=(53, 42), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def spec(method, budget="1", source=None, **kw):
    opts = dict(page_size=8, moba_block=8, random_block=8, quest_dense_layers=1, random_dense_layers=1,
                snap_window=8)
    opts.update(kw)
    return MethodSpec(method, parse_budget(budget), source or KVSource("plain", "plain"), **opts)


def src(engine):
    return KVSource("mem", "mem") if engine.memory else KVSource("plain", "plain")


# ------------------------------------------------------------------------------ engine: exactness


_DENSE = {}


def dense_of(engine):
    """The dense reference of prompts() (computed once per engine)."""
    if id(engine) not in _DENSE:
        _DENSE[id(engine)] = engine.generate(prompts(), spec("dense", source=src(engine)), NEW, return_logits=True)
    return _DENSE[id(engine)]


def test_dense_matches_hf_generate(engine):
    ps = prompts()
    got = dense_of(engine)
    model = engine.model
    model.set_attn_implementation("sdpa")
    try:
        for p, g in zip(ps, got):
            ref = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
            assert ref[0, len(p):].tolist() == g["tokens"]
    finally:
        model.set_attn_implementation("niah_sparse")


@pytest.mark.parametrize("method", ["quest", "moba", "random", "snapkv", "dilated"])
def test_full_budget_equals_dense(engine, method):
    ps = prompts()
    dense = dense_of(engine)
    variants = [dict(per_query_head=pq) for pq in ((False, True) if method in ("quest", "moba", "snapkv") else (False,))]
    if method == "quest":
        variants.append(dict(quest_bounds="int8"))
    for opts in variants:
        got = engine.generate(ps, spec(method, source=src(engine), **opts), NEW, return_logits=True)
        for d, g in zip(dense, got):
            assert g["tokens"] == d["tokens"]
            torch.testing.assert_close(g["logits"], d["logits"], atol=2e-4, rtol=1e-4)


def test_dilated_chunk1_token_budget_equals_dense(engine):
    ps = prompts()
    dense = dense_of(engine)
    s = spec("dilated", "42", source=src(engine))  # a token budget about the context: chunk D = 1
    assert s.dilated_chunk(53) == 1
    got = engine.generate(ps, s, NEW, return_logits=True)
    for d, g in zip(dense, got):
        torch.testing.assert_close(g["logits"], d["logits"], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("T, chunk, window, prefix, rows", [
    (97, 4, 0, 0, 16), (97, 4, 5, 3, 16), (130, 7, 19, 10, 32), (64, 16, 0, 1, 64), (50, 1, 6, 0, 8),
    (75, 3, 40, 70, 16)])
def test_dilated_prefill_gathered_keys_equal_full_mask(T, chunk, window, prefix, rows):
    """The prefill attends only the gathered candidate keys of each query slice: equal to SDPA over
    all keys with the whole dilated mask (GQA, odd lengths, window and prefix across slices)."""
    import eval.engine.engine as eng

    g = torch.Generator().manual_seed(T + chunk)
    q = torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, T, 16, generator=g, dtype=torch.float64) for _ in range(2))
    mask = ks.dilated_mask(torch.arange(T), T, chunk, window, prefix)
    ref = eng._sdpa(q, k, v, 0.25, mask=mask[None, None])
    torch.testing.assert_close(eng._dilated_prefill(q, k, v, 0.25, chunk, window, prefix, rows=rows), ref)


def test_memory_sources(engine):
    """Selection source does not matter at full budget; plain compute differs from mem compute."""
    if not engine.memory:
        with pytest.raises(SpecError, match="memory model"):
            engine.generate(prompts(), spec("quest", source=KVSource("mem", "mem")), NEW)
        return
    ps = prompts()
    for comp in ("mem", "plain"):
        dense = engine.generate(ps, spec("dense", source=KVSource(comp, comp)), NEW, return_logits=True)
        other = "plain" if comp == "mem" else "mem"
        got = engine.generate(ps, spec("quest", source=KVSource(other, comp)), NEW, return_logits=True)
        for d, g in zip(dense, got):
            torch.testing.assert_close(g["logits"], d["logits"], atol=2e-4, rtol=1e-4)
    a = engine.generate(ps, spec("dense", source=KVSource("mem", "mem")), NEW, return_logits=True)
    b = engine.generate(ps, spec("dense", source=KVSource("plain", "plain")), NEW, return_logits=True)
    assert not torch.allclose(a[0]["logits"], b[0]["logits"])
    # a sparse budget runs with every source combination
    for s in ("mem", "plain", "selection=plain,compute=mem", "selection=mem,compute=plain"):
        out = engine.generate(ps, spec("quest", "1/4", source=parse_kv_source(s)), 3)
        assert all(len(o["tokens"]) == 3 for o in out)


def test_quest_eval_variant(attn_engine):
    """Quest's evaluation variant (no forced page, at least 3 pages): a 2-page budget attends 3
    pages, i.e. equals a 3-page budget; at full budget it equals dense."""
    ps = prompts()
    ev = dict(quest_force_current=False, quest_min_pages=3)
    a = attn_engine.generate(ps, spec("quest", "16", source=src(attn_engine), **ev), NEW, return_logits=True)
    b = attn_engine.generate(ps, spec("quest", "24", source=src(attn_engine), quest_force_current=False), NEW,
                        return_logits=True)
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        torch.testing.assert_close(x["logits"], y["logits"], atol=0, rtol=0)
    full = attn_engine.generate(ps, spec("quest", source=src(attn_engine), **ev), NEW, return_logits=True)
    for d, g in zip(dense_of(attn_engine), full):
        assert g["tokens"] == d["tokens"]
        torch.testing.assert_close(g["logits"], d["logits"], atol=2e-4, rtol=1e-4)


def _recompute_meta(spec, layer, n):
    """The reference: Quest/MoBA metadata recomputed over the whole cache, [B, Hkv, n_blocks, D]."""
    T = int(n.max())
    if spec.method == "quest":
        quant = None if spec.quest_bounds == "exact" else spec.quest_bounds
        return ks.page_minmax(layer.ks[:, :, :T], spec.page_size, seq_len=n, quant=quant)
    return (ks.block_means(layer.ks[:, :, :T], spec.moba_block, seq_len=n),)


def test_generate_stats(attn_engine):
    """generate(stats=...) times the prompt and the decoding steps after it."""
    stats = {}
    out = attn_engine.generate(prompts(), spec("quest", "1/2"), NEW, stats=stats)
    assert stats["decode_steps"] == NEW - 1 and all(len(o["tokens"]) == NEW for o in out)
    assert stats["prefill_s"] > 0 and stats["decode_s"] > 0
    assert len(stats["decode_step_s"]) == NEW - 1 and sum(stats["decode_step_s"]) <= stats["decode_s"]


def test_kv_stored_once(engine, monkeypatch):
    """After the prompt, the HF cache holds no K/V storage: the engine's buffers are the only copy
    (a slice view left in the cache would double the KV memory until each layer's next step)."""
    import eval.engine.engine as eng

    made = []
    make = eng._make_cache
    monkeypatch.setattr(eng, "_make_cache", lambda model: made.append(make(model)) or made[-1])
    engine.generate(prompts(), spec("quest", "1/2", source=src(engine)), 1)
    layers = made[0].layers
    assert len(layers) == TINY["num_hidden_layers"]
    for layer in layers:
        assert layer.keys.shape[2] == 0 and layer.keys.untyped_storage().nbytes() == 0
        assert layer.values.shape[2] == 0 and layer.values.untyped_storage().nbytes() == 0


def test_incremental_metadata_equals_recompute(attn_engine, monkeypatch):
    """The decode loop's page refresh (exact and int8 bounds) and incremental block means equal a
    recompute over the whole cache at every step and layer, and generation matches a run that
    recomputes."""
    import eval.engine.engine as eng

    incremental = eng._update_meta
    steps = []

    def checked(spec_, layer, n):
        incremental(spec_, layer, n)
        for m, r in zip(layer.meta, _recompute_meta(spec_, layer, n)):
            P = r.shape[2]
            if spec_.method == "quest":
                assert torch.equal(m[:, :, :P], r)
            else:
                torch.testing.assert_close(m[:, :, :P], r, atol=1e-6, rtol=1e-6)
            assert (m[:, :, P:] == 0).all()  # pages/blocks ahead stay empty
        steps.append(spec_.method)

    def recompute(spec_, layer, n):
        for m, r in zip(layer.meta, _recompute_meta(spec_, layer, n)):
            m.zero_()
            m[:, :, : r.shape[2]] = r

    ps, new = prompts(), 8  # 53 + 8 and 42 + 8 tokens: page/block boundaries 56 and 48 crossed
    for method, opts in (("quest", {}), ("quest", dict(quest_bounds="int8")), ("moba", {})):
        s = spec(method, "1/2", source=src(attn_engine), **opts)
        monkeypatch.setattr(eng, "_update_meta", checked)
        a = attn_engine.generate(ps, s, new, return_logits=True)
        if method == "quest":  # metadata bit-equal to the recompute at every step: same run
            continue
        monkeypatch.setattr(eng, "_update_meta", recompute)  # means: equal up to fp32 rounding
        b = attn_engine.generate(ps, s, new, return_logits=True)
        for x, y in zip(a, b):
            assert x["tokens"] == y["tokens"]
            torch.testing.assert_close(x["logits"], y["logits"], atol=1e-5, rtol=1e-5)
    assert steps.count("quest") == 2 * (new - 1) * (TINY["num_hidden_layers"] - 1)  # 1 dense layer
    assert steps.count("moba") == (new - 1) * TINY["num_hidden_layers"]


def test_sparse_budgets_run(engine):
    ps = prompts()
    for m in ("quest", "moba", "random", "snapkv", "dilated"):
        out = engine.generate(ps, spec(m, "1/4", source=src(engine)), 3)
        assert [len(o["tokens"]) for o in out] == [3, 3]


# ------------------------------------------------------------------------------ engine: decode modes


def _same_generation(a, b, atol=2e-5):
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        torch.testing.assert_close(x["logits"], y["logits"], atol=atol, rtol=1e-5 if atol else 0)


@pytest.mark.parametrize("method", ["dense", "quest", "moba", "random", "snapkv", "dilated"])
def test_static_decode_equals_eager(engine, method):
    """Fixed shapes (full buffers, rows masked by length, in-place updates: what a CUDA graph
    replays) give the eager loop's tokens and logits, over page/block boundaries (12 tokens past
    prompts of 53 and 42) and at budgets whose block count grows during decoding (full budget).
    Random draws over the whole buffer's blocks when static, so only its full budget compares."""
    ps, new = prompts(), 12
    budgets = ("1",) if method in ("dense", "random") else ("1", "1/2")
    variants = [dict(per_query_head=pq) for pq in ((False, True) if method in ("quest", "moba", "snapkv") else (False,))]
    if method == "quest":
        variants.append(dict(quest_bounds="int8"))
    for budget, opts in itertools.product(budgets, variants):
        s = spec(method, budget, source=src(engine), **opts)
        eager = engine.generate(ps, s, new, return_logits=True, decode="eager")
        stats = {}
        static = engine.generate(ps, s, new, return_logits=True, decode="static", stats=stats)
        assert stats["decode_mode"] == "static"
        _same_generation(eager, static)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["attention", "memory"])
def test_graph_decode_equals_eager_cuda(kind):
    """The CUDA-graph decoding loop (captured again whenever the step's host parameters change)
    on the GPU's Triton kernels: bit-equal to the same fixed-shape loop run eagerly, and equal to the
    eager loop, for every method and both K/V sources (head dim 32 for tl.dot). Random draws the
    same numbers in a graph as eagerly (its generator is registered with the graph); the eager
    loop draws over fewer blocks, so it compares at full budget only."""
    engine = Engine(make_model(kind, hidden_size=128, intermediate_size=192).cuda(), eos_token_ids=[])
    ps, new = prompts(), 20
    srcs = [src(engine)] + ([KVSource("plain", "mem")] if engine.memory else [])
    for method, opts in (("dense", {}), ("quest", {}), ("quest", dict(quest_bounds="int8")), ("moba", {}),
                         ("snapkv", {}), ("dilated", {}), ("random", {})):
        for budget in (("1",) if method == "dense" else ("1", "1/2")):
            for source in srcs:
                s = spec(method, budget, source=source, **opts)
                eager = engine.generate(ps, s, new, return_logits=True, decode="eager")
                static = engine.generate(ps, s, new, return_logits=True, decode="static")
                stats = {}
                graph = engine.generate(ps, s, new, return_logits=True, stats=stats)
                assert stats["decode_mode"] == "graph"
                _same_generation(static, graph, atol=0)
                if method != "random" or budget == "1":
                    _same_generation(eager, graph, atol=1e-3)
    # an evaluation makes thousands of generate calls: each one's graphs and buffers go with it
    s = spec("quest", "1", source=srcs[0])
    engine.generate(ps, s, new)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(3):
        engine.generate(ps, s, new)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == base


def test_decode_mode_errors(attn_engine):
    with pytest.raises(ValueError, match="decode mode 'fast'"):
        attn_engine.generate(prompts(), spec("quest", "1/2"), 2, decode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            attn_engine.generate(prompts(), spec("quest", "1/2"), 2, decode="graph")
    want = "graph" if attn_engine.device.type == "cuda" else "eager"
    assert attn_engine.decode_mode() == want


# ------------------------------------------------------------------------------ selectors


def _planted(T=96, D=16, hkv=2, G=2, page=8, planted=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, hkv, T, D, generator=g) * 0.1
    q = torch.randn(1, hkv * G, D, generator=g)
    k[:, :, planted * page : (planted + 1) * page] = 5 * q.view(1, hkv, G, D).mean(2)[:, :, None]
    return q, k


def test_quest_selects_planted_page():
    q, k = _planted()
    n = torch.tensor([96])
    for quant in (None, "int8"):
        bounds = ks.page_minmax(k, 8, seq_len=n, quant=quant)
        for per_q in (False, True):
            idx = quest_select(q, bounds, n, 8, nsel=2, force_current=True, per_query_head=per_q)
            assert idx.shape == (1, 4 if per_q else 2, 2)
            assert (idx == 3).any(-1).all() and (idx == 11).any(-1).all()  # planted + current page
        idx = quest_select(q, bounds, n, 8, nsel=1, force_current=False)
        assert (idx[..., 0] == 3).all()


def test_quest_min_pages_selector():
    q, k = _planted()
    n = torch.tensor([96, 12])
    k = k.expand(2, -1, -1, -1).contiguous()
    q = q.expand(2, -1, -1).contiguous()
    kmin, kmax = ks.page_minmax(k, 8, seq_len=n)
    for per_q in (False, True):
        idx = quest_select(q, (kmin, kmax), n, 8, nsel=1, force_current=False, per_query_head=per_q, min_pages=3)
        assert idx.shape == (2, 4 if per_q else 2, 3)
        assert ((idx[0] >= 0).sum(-1) == 3).all() and (idx[0] == 3).any(-1).all()  # 3 pages, planted kept
        assert (idx[1] == torch.tensor([0, 1, -1], dtype=idx.dtype)).all()  # only 2 pages exist: both
        # without min_pages the budget alone (1 page), with it never fewer than the budget
        assert quest_select(q, (kmin, kmax), n, 8, nsel=1, force_current=False, per_query_head=per_q).shape[-1] == 1
        assert quest_select(q, (kmin, kmax), n, 8, nsel=5, force_current=False, per_query_head=per_q,
                            min_pages=3).shape[-1] == 5


def test_moba_selects_planted_block():
    q, k = _planted()
    n = torch.tensor([96])
    means = ks.block_means(k, 8, seq_len=n)
    idx = moba_select(q, means, n, 8, nsel=2)
    assert idx.shape == (1, 2, 2)
    assert idx[0].tolist() == [[3, 11], [3, 11]]


def test_snapkv_keeps_window():
    g = torch.Generator().manual_seed(0)
    T, W, C = 64, 8, 24
    q_win, k = torch.randn(1, 4, W, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
    keep = snapkv_keep(q_win, k, C, kernel=7, pool="max")
    assert keep.shape == (2, C)
    assert keep[:, -W:].tolist() == [list(range(T - W, T))] * 2
    assert (keep.diff(dim=-1) > 0).all()
    assert snapkv_keep(q_win, k, T).shape == (2, T)  # T <= C: everything kept
    # per query head (G = 2): one set per query head, window kept, ascending
    keep = snapkv_keep(q_win, k, C, kernel=7, pool="max", per_query_head=True)
    assert keep.shape == (4, C)
    assert keep[:, -W:].tolist() == [list(range(T - W, T))] * 4
    assert (keep.diff(dim=-1) > 0).all()
    assert snapkv_keep(q_win, k, T, per_query_head=True).shape == (4, T)
    # query heads of a group with equal window queries choose what the group average chooses
    q_same = q_win[:, :2].reshape(1, 2, 1, W, 16).expand(1, 2, 2, W, 16).reshape(1, 4, W, 16)
    kv = snapkv_keep(q_same, k, C, kernel=7, pool="max")
    qh = snapkv_keep(q_same, k, C, kernel=7, pool="max", per_query_head=True)
    assert torch.equal(qh, kv.repeat_interleave(2, 0))


def test_snapkv_per_query_head_engine(attn_engine):
    """G = 2: the per-query-head cache (K/V repeated to Hq heads) runs at a sparse budget and
    differs from the group-averaged selection; full budget equals dense is in
    test_full_budget_equals_dense."""
    ps = prompts()
    a = attn_engine.generate(ps, spec("snapkv", "1/2", source=src(attn_engine), per_query_head=True), 3,
                             return_logits=True)
    b = attn_engine.generate(ps, spec("snapkv", "1/2", source=src(attn_engine)), 3, return_logits=True)
    assert [len(o["tokens"]) for o in a] == [3, 3]
    assert all(torch.isfinite(o["logits"]).all() for o in a)
    assert not torch.equal(a[0]["logits"], b[0]["logits"])


# ------------------------------------------------------------------------------ specs


def test_budgets_and_sources():
    assert parse_budget("1/16").fraction == Fraction(1, 16) and parse_budget("0.25").fraction == Fraction(1, 4)
    assert parse_budget("512").tokens == 512 and parse_budget("1").full
    for bad in ("3/2", "1.5", "0", "-1/4", "x"):
        with pytest.raises(SpecError):
            parse_budget(bad)
    with pytest.raises(SpecError, match="below one block"):
        MethodSpec("quest", parse_budget("1/32")).check(256)  # 8 tokens < one 16-token page
    with pytest.raises(SpecError, match="above 1"):
        MethodSpec("quest", parse_budget("4096")).check(1000)
    MethodSpec("quest", parse_budget("1/16")).check(4096)
    with pytest.raises(SpecError, match="unknown method"):
        MethodSpec("bogus")
    assert parse_kv_source("selection=plain,compute=mem") == KVSource("plain", "mem")
    assert parse_kv_source("plain").label == "plain"
    with pytest.raises(SpecError):
        parse_kv_source("compute=kv")


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-olmo2")
    tok = AutoTokenizer.from_pretrained(TINY_BPE)
    model = make_model("attention")
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _cli(argv):
    sys.path.insert(0, str(REPO / "eval"))
    try:
        import niah  # eval/niah.py, as `python eval/niah.py` would import it
    finally:
        sys.path.remove(str(REPO / "eval"))
    return niah.main([str(a) for a in argv])


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", tiny_model_dir, "--tasks", "niah_single_1,niah_multikey_2", "--lengths", "512",
            "--methods", "dense,quest", "--budgets", "1/2,1/4", "--samples", 2, "--out", out, "--batch-size", 2,
            "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", 4]
    assert _cli(argv) == 0
    runs = ["dense_full_plain", "quest_1-2_plain", "quest_1-4_plain"]
    for task in ("niah_single_1", "niah_multikey_2"):
        assert (out / "data" / "512" / f"{task}.jsonl").exists()
        for r in runs:
            rows = [json.loads(line) for line in (out / "pred" / "512" / r / f"{task}.jsonl").read_text().splitlines()]
            assert [x["index"] for x in rows] == [0, 1] and all("pred" in x and x["outputs"] for x in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 3 and all(set(r["tasks"]) == {"niah_single_1", "niah_multikey_2"}
                                             for r in summary["runs"])
    md = (out / "summary.md").read_text()
    assert "| quest | 1/4 | plain |" in md and "niah_multikey_2" in md
    assert (out / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun decodes nothing: every sample is already there
    stamp = {p: p.read_text() for p in (out / "pred").rglob("*.jsonl")}
    import eval.engine.engine as eng

    calls = []
    orig = eng.Engine.generate
    eng.Engine.generate = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        assert _cli(argv) == 0
    finally:
        eng.Engine.generate = orig
    assert not calls and {p: p.read_text() for p in stamp} == stamp
    # an interrupted run (one prediction missing) is completed, not redone
    f = out / "pred" / "512" / "quest_1-4_plain" / "niah_single_1.jsonl"
    f.write_text(f.read_text().splitlines()[0] + "\n")
    eng.Engine.generate = lambda self, prompts, *a, **k: calls.append(len(prompts)) or orig(self, prompts, *a, **k)
    try:
        assert _cli(argv) == 0
    finally:
        eng.Engine.generate = orig
    assert calls == [1] and len(f.read_text().splitlines()) == 2


def test_cli_shards_add_up_to_the_unsharded_run(tiny_model_dir, tmp_path, capsys):
    """Two shards (as two tasks of a job array): each decodes its own samples into its own files,
    the first to end writes no report, the last one writes the same summary as one unsharded run;
    a rerun with other sharding decodes nothing."""
    base = ["--model", tiny_model_dir, "--tasks", "niah_single_1,niah_multivalue", "--lengths", "512",
            "--methods", "dense,quest", "--budgets", "1/4", "--samples", 3, "--batch-size", 1,
            "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", 4]
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert _cli(base + ["--out", one]) == 0
    assert _cli(base + ["--out", sharded, "--shard", "1/2"]) == 0
    assert "not there yet" in capsys.readouterr().out and not (sharded / "summary.json").exists()
    run = sharded / "pred" / "512" / "quest_1-4_plain"
    assert [json.loads(x)["index"] for x in (run / "niah_multivalue.shard-1-of-2.jsonl").read_text().splitlines()] == [1]
    assert _cli(base + ["--out", sharded, "--shard", "0/2"]) == 0
    assert [json.loads(x)["index"] for x in (run / "niah_multivalue.shard-0-of-2.jsonl").read_text().splitlines()] == [0, 2]
    assert not (run / "niah_multivalue.jsonl").exists()
    a, b = (json.loads((d / "summary.json").read_text())["runs"] for d in (one, sharded))
    assert a == b and all(r["n"] == {"niah_single_1": 3, "niah_multivalue": 3} for r in b)
    umask = os.umask(0)
    os.umask(umask)
    for f in (sharded / "summary.json", sharded / "data" / "512" / "niah_multivalue.jsonl"):  # not mkstemp's 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert not list(sharded.rglob("*.tmp"))
    import eval.engine.engine as eng

    calls = []
    orig = eng.Engine.generate
    eng.Engine.generate = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        assert _cli(base + ["--out", sharded]) == 0 and _cli(base + ["--out", sharded, "--shard", "2/3"]) == 0
    finally:
        eng.Engine.generate = orig
    assert not calls


@pytest.mark.parametrize("extra, msg", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
    (["--tasks", "niah_bogus"], "unknown task"),
    (["--shard", "2/2"], "bad --shard"),
    (["--shard", "1"], "bad --shard"),
    (["--methods", "dense,bogus"], "unknown method"),
    (["--budgets", "3/2"], "above 1"),
    (["--budgets", "1/64"], "below one block"),
    (["--tasks", "niah_single_1", "--device", "cpu", "--decode", "graph"],
     "--decode graph: decode mode 'graph' needs a CUDA device"),
])
def test_cli_errors(tiny_model_dir, tmp_path, capsys, extra, msg):
    argv = ["--model", tiny_model_dir, "--lengths", "512", "--methods", "quest", "--out", tmp_path / "o",
            "--samples", 1] + extra
    assert _cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cli_graph_decode_cuda(tmp_path, capsys):
    """`eval/niah.py` on the GPU with a memory model: the default decoding loop (CUDA graphs) writes
    the same predictions as `--decode eager`, for every method it replays (fp32)."""
    d = tmp_path / "tiny-memory"
    tok = AutoTokenizer.from_pretrained(TINY_BPE)
    model = make_model("memory", hidden_size=128, intermediate_size=192)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    base = ["--model", d, "--tasks", "niah_single_1,niah_multikey_2", "--lengths", "1024", "--samples", 2,
            "--methods", "dense,quest,quest+int8,moba,snapkv,dilated", "--budgets", "1/4", "--dtype", "fp32",
            "--max-new-tokens", 12, "--page-size", 16, "--moba-block", 32]
    assert _cli(base + ["--out", tmp_path / "graph"]) == 0
    assert _cli(base + ["--out", tmp_path / "eager", "--decode", "eager"]) == 0
    runs = sorted((tmp_path / "graph" / "pred" / "1024").iterdir())
    assert len(runs) == 6
    for run in runs:
        for f in run.iterdir():
            other = tmp_path / "eager" / "pred" / "1024" / run.name / f.name
            preds = [[json.loads(x)["pred"] for x in g.read_text().splitlines()] for g in (f, other)]
            assert preds[0] == preds[1], (run.name, f.name)


def test_cli_subprocess_no_tokenizer(tmp_path):
    """Run as `python eval/niah.py` from the repo root: a model dir without a tokenizer is exit 2."""
    d = tmp_path / "no-tok"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "olmo2", **{k: v for k, v in TINY.items()
                                                                        if k != "rope_parameters"}}))
    r = subprocess.run([sys.executable, "eval/niah.py", "--model", str(d), "--out", str(tmp_path / "o"),
                        "--lengths", "512"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "no tokenizer in it" in r.stderr and r.stderr.strip().startswith("error:")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_report_refuses_missing_runs(tmp_path, capsys):
    """eval/report.py on a mistyped or empty run directory: one line and exit 2, no empty report."""
    from eval.report import main

    (tmp_path / "empty").mkdir()
    for run, msg in ((tmp_path / "nope", "no such directory"), (tmp_path / "empty", "no predictions")):
        assert main([str(run), "--out", str(tmp_path / "rep")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "rep").exists()


def test_cli_quest_eval_variant_flags():
    from eval.niah import build_parser, make_specs, parse_methods
    from eval.engine.spec import parse_budgets

    args = build_parser().parse_args(["--model", "x", "--out", "y"])
    (d,) = make_specs(args, ["quest"], parse_budgets("1/16"), [KVSource("plain", "plain")])
    assert d.quest_force_current and d.quest_min_pages == 0  # today's default: Quest's fast version
    args = build_parser().parse_args(["--model", "x", "--out", "y", "--quest-no-force-current",
                                      "--quest-min-pages", "3"])
    (e,) = make_specs(args, ["quest"], parse_budgets("1/16"), [KVSource("plain", "plain")])
    assert not e.quest_force_current and e.quest_min_pages == 3
    assert d.quest_bounds == "exact"
    # a variant name: both Quest flavours from one call, each under its own label
    args = build_parser().parse_args(["--model", "x", "--out", "y", "--methods", "quest,quest+int8"])
    (e2, i) = make_specs(args, parse_methods(args.methods), parse_budgets("1/16"), [KVSource("plain", "plain")])
    assert e2.quest_bounds == "exact" and e2.label == "quest_1-16_plain"
    assert i.quest_bounds == "int8" and i.label == "quest+int8_1-16_plain"
    with pytest.raises(SpecError, match="unknown method"):
        parse_methods("moba+int8")
    with pytest.raises(SpecError, match="bad quest_bounds 'fp8'"):
        MethodSpec("quest", quest_bounds="fp8")


def test_variants_write_to_their_own_folders():
    """Quest's evaluation variant and per-query-head selection must not reuse another run's predictions."""
    from eval.engine.spec import MethodSpec

    labels = {MethodSpec("quest").label, MethodSpec("quest", quest_force_current=False, quest_min_pages=3).label,
              MethodSpec("quest", per_query_head=True).label, MethodSpec("snapkv", per_query_head=True).label,
              MethodSpec("snapkv").label, MethodSpec("quest", quest_bounds="int8").label}
    assert len(labels) == 6
    assert MethodSpec("quest").label == "quest_full_plain"  # defaults keep their paths


def test_report_orders_variants_after_their_method():
    """Table and plot order: a method variant (quest+int8, quest+nocur+min3) right after its base."""
    from eval.report import _method_rank

    methods = ["random", "quest+int8", "moba", "dense", "quest", "snapkv", "quest+nocur+min3", "other"]
    assert sorted(methods, key=_method_rank) == ["dense", "quest", "quest+int8", "quest+nocur+min3", "moba",
                                                 "snapkv", "random", "other"]


def test_bench_niah_scale_runs_on_cpu(tmp_path):
    """bench/niah_scale.py (the 7B x 128K cost benchmark, run on the H200) on a tiny shape on CPU:
    method names incl. the quest+int8 variant, its rows and the decoding loops' agreement."""
    cfg = json.loads((REPO / "tests" / "data" / "olmo2-7b-config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, "bench/niah_scale.py", "--config", str(tmp_path / "config.json"),
                        "--lengths", "1024", "--methods", "dense,quest,quest+int8", "--new-tokens", "2",
                        "--decode", "eager", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [x["label"] for x in rows] == ["dense_full_mem", "quest_1-16_mem", "quest+int8_1-16_mem"]
    assert all(x["generated"] == 3 and "error" not in x for x in rows)
    r = subprocess.run([sys.executable, "bench/niah_scale.py", "--config", str(tmp_path / "config.json"),
                        "--lengths", "1024", "--methods", "moba+int8", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "error: unknown method 'moba+int8'; known: dense, dilated, quest, moba, snapkv, random, quest+int8")
