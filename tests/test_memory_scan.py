"""The decaying-memory scan: Triton kernels (through TRITON_INTERPRET=1 on CPU) and the torch
twin against the float64 sequential loop. Small shapes: the interpreter is slow."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.memory_scan import memory_scan, memory_scan_step  # noqa: E402
from kernels.memory_scan.naive import memory_scan_loop, memory_scan_torch  # noqa: E402

triton = pytest.importorskip("triton")
from kernels.memory_scan.fused import memory_scan_fused  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                   reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEV = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}
# Launch plans of fused.py: the default (what memory_scan runs on a GPU; on these small shapes
# one forward chunk and the backward's loop schedule) and small tiles that take the other paths:
# several forward chunks of several tiles (all three forward launches; CT=6 leaves a partial
# last chunk), several channel blocks per head (BD < D), and the backward's loop and chained
# (look-back) schedules. Masked heads: test_forward_tiles.
SMALL_FWD = dict(kernel="chunk", BT=4, CT=8, BH=2, BD=8)
PLANS = {"default": {},
         "chunks-loop": dict(fwd=SMALL_FWD, bwd=dict(BT=8, BD=8, schedule="loop")),
         "chunks-chained": dict(fwd=dict(kernel="chunk", BT=2, CT=6, BH=1, BD=4),
                                bwd=dict(BT=8, BD=8, schedule="chained"))}
PLAN_IDS = list(PLANS)
FWD_PLANS = {"default": {}, "chunks": dict(fwd=SMALL_FWD),  # forward-only tests
             # one launch: 2 sub-blocks of 8 lanes x 4 segments, and one block x 8 segments
             "seq": dict(fwd=dict(kernel="seq", BH=2, BD=8, W=4, num_warps=2)),
             "seq-W8": dict(fwd=dict(kernel="seq", BH=1, BD=8, W=8)),
             "seq-W16": dict(fwd=dict(kernel="seq", BH=2, BD=8, W=16)),  # the narrow default's tile
             # loads pipelined through shared memory (tl.range num_stages, which the interpreter ignores)
             "chunks-staged": dict(fwd=dict(SMALL_FWD, stages=3))}


def _inputs(B, T, H, D, *, n_states=None, gate_shift=0.0, gate_scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) * gate_scale + gate_shift
    k = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    N = B if n_states is None else n_states
    h0 = (torch.randn(N, H, D, generator=gen, dtype=torch.float64),
          torch.randn(N, H, D, generator=gen, dtype=torch.float64))
    return z, k, v, h0


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()  # the float64 references live on the CPU
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _check_fwd(out, ref, dtype):
    for a, b in zip(out[:2], ref[:2]):
        assert a.dtype == dtype
        assert _rel(a, b) < TOL[dtype]
    if len(ref) > 2:
        for a, b in zip(out[2], ref[2]):
            assert a.dtype == torch.float32
            assert _rel(a, b) < TOL[dtype]


# ---------------------------------------------------------------------------------------------
# torch twin


@pytest.mark.parametrize("cu", [None, [0, 4, 4, 11, 19]])
def test_torch_twin_matches_loop(cu):
    B = 2 if cu is None else 1
    z, k, v, h0 = _inputs(B, 19, 2, 5, n_states=None if cu is None else len(cu) - 1)
    cu_t = None if cu is None else torch.tensor(cu)
    ref = memory_scan_loop(z, k, v, h0, cu_seqlens=cu_t, output_final_state=True)
    out = memory_scan_torch(z.float(), k.float(), v.float(), tuple(s.float() for s in h0),
                            cu_seqlens=cu_t, output_final_state=True)
    _check_fwd(out, ref, torch.float32)


# ---------------------------------------------------------------------------------------------
# fused forward


@needs_kernels
@pytest.mark.parametrize("plan", FWD_PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 37, 2, 8), (1, 1, 2, 8), (1, 40, 1, 24)])
def test_fused_forward(shape, dtype, plan):
    B, T, H, D = shape
    z, k, v, h0 = _inputs(*shape, seed=T)
    x = [t.to(DEV, dtype) for t in (z, k, v)]
    # fp16 inputs are rounded: the reference sees the same rounded values
    ref = memory_scan_loop(*(t.double().cpu() for t in x), h0, output_final_state=True)
    out = memory_scan_fused(*x, tuple(s.float().to(DEV) for s in h0), output_final_state=True,
                            **FWD_PLANS[plan])
    _check_fwd(out, ref, dtype)


@needs_kernels
@pytest.mark.parametrize("plan", FWD_PLANS)
@pytest.mark.parametrize("gate_shift", [-12.0, 12.0])
def test_fused_gates_near_0_and_1(gate_shift, plan):
    z, k, v, h0 = _inputs(2, 33, 2, 8, gate_shift=gate_shift, gate_scale=1.0)
    ref = memory_scan_loop(z, k, v, h0, output_final_state=True)
    out = memory_scan_fused(*(t.float().to(DEV) for t in (z, k, v)),
                            tuple(s.float().to(DEV) for s in h0), output_final_state=True,
                            **FWD_PLANS[plan])
    _check_fwd(out, ref, torch.float32)


@needs_kernels
def test_public_op_dispatch_and_no_state():
    z, k, v, _ = _inputs(1, 20, 2, 8)
    x = [t.float().to(DEV) for t in (z, k, v)]
    ref = memory_scan_loop(z, k, v)
    out = memory_scan(*x, backend="triton")
    assert len(out) == 2
    _check_fwd(out, ref, torch.float32)
    out_t = memory_scan(*x, backend="torch")
    _check_fwd(out_t, ref, torch.float32)
    with pytest.raises(ValueError):
        memory_scan(*x, backend="cuda")


def test_env_overrides_auto_backend(monkeypatch):
    from kernels._dispatch import ENV, use_triton

    cpu = torch.zeros(1)
    assert not use_triton("auto", cpu)
    monkeypatch.setenv(ENV, "triton")
    assert use_triton("auto", cpu) and not use_triton("torch", cpu)
    monkeypatch.setenv(ENV, "torch")
    assert not use_triton("auto", cpu) and use_triton("triton", cpu)
    monkeypatch.setenv(ENV, "gpu")
    with pytest.raises(ValueError, match=ENV):
        use_triton("auto", cpu)


# ---------------------------------------------------------------------------------------------
# gradients against torch.autograd through the float64 loop


def _grads_ref(z, k, v, h0, w, cu=None):
    ins = [t.clone().requires_grad_() for t in (z, k, v, *h0)]
    ok, ov, (fk, fv) = memory_scan_loop(*ins[:3], (ins[3], ins[4]), cu_seqlens=cu,
                                        output_final_state=True)
    loss = sum((a * b).sum() for a, b in zip((ok, ov, fk, fv), w))
    return torch.autograd.grad(loss, ins)


def _grads_fused(z, k, v, h0, w, dtype, cu=None, **opts):
    ins = [t.to(DEV, dtype).requires_grad_() for t in (z, k, v)]
    ins += [s.to(DEV, torch.float32).requires_grad_() for s in h0]
    ok, ov, (fk, fv) = memory_scan_fused(*ins[:3], (ins[3], ins[4]), cu_seqlens=cu,
                                         output_final_state=True, **opts)
    loss = sum((a.float() * b.to(DEV, torch.float32)).sum() for a, b in zip((ok, ov, fk, fv), w))
    return torch.autograd.grad(loss, ins)


@needs_kernels
@pytest.mark.parametrize("plan", PLAN_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_gradients(plan, dtype):
    if plan == "chunks-chained" and dtype == torch.float16:
        pytest.skip("fp16 gradients are covered on the other plans; keeps the file fast")
    shape = (2, 21, 2, 8)
    z, k, v, h0 = _inputs(*shape, seed=3)
    z, k, v = (t.to(dtype).double() for t in (z, k, v))
    w = [torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64),
         torch.randn(2, 2, 8, dtype=torch.float64), torch.randn(2, 2, 8, dtype=torch.float64)]
    ref = _grads_ref(z, k, v, h0, w)
    got = _grads_fused(z, k, v, h0, w, dtype, **PLANS[plan])
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # fp16 outputs feed the gate gradient
    for a, b in zip(got, ref):
        assert _rel(a, b) < tol


# packed sequences incl. an empty and a length-1 one; with the small plans' tiles (BT 4 / 2,
# CT 8 / 6) bounds fall inside tiles, on tile and chunk edges, and sequences span several chunks
PACKED_CU = [0, 3, 3, 8, 9, 24, 41, 50]


def _check_packed_forward(opts):
    """Forward with PACKED_CU (fp32, initial states) against the float64 loop; returns what the
    gradient test reuses: (cu_t, (z, k, v, h0), fused output)."""
    cu = PACKED_CU
    N, T, H, D = len(cu) - 1, cu[-1], 2, 8
    z, k, v, h0 = _inputs(1, T, H, D, n_states=N, seed=7)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    ref = memory_scan_loop(z, k, v, h0, cu_seqlens=cu_t, output_final_state=True)
    out = memory_scan_fused(*(t.float().to(DEV) for t in (z, k, v)),
                            tuple(s.float().to(DEV) for s in h0), cu_seqlens=cu_t.to(DEV),
                            output_final_state=True, **opts)
    _check_fwd(out, ref, torch.float32)
    return cu_t, (z, k, v, h0), out


@needs_kernels
@pytest.mark.parametrize("plan", PLAN_IDS)
def test_fused_cu_seqlens_resets_and_gradients(plan):
    cu = PACKED_CU
    cu_t, (z, k, v, h0), out = _check_packed_forward(PLANS[plan])
    N, T, H, D = len(cu) - 1, cu[-1], 2, 8
    # each packed sequence equals its own unpacked scan
    for n, (s, e) in enumerate(zip(cu, cu[1:])):
        if e > s:
            own = memory_scan_loop(z[:, s:e], k[:, s:e], v[:, s:e], (h0[0][n:n + 1], h0[1][n:n + 1]))
            assert _rel(out[0][:, s:e], own[0]) < 2e-5
    w = [torch.randn(1, T, H, D, dtype=torch.float64), torch.randn(1, T, H, D, dtype=torch.float64),
         torch.randn(N, H, D, dtype=torch.float64), torch.randn(N, H, D, dtype=torch.float64)]
    ref_g = _grads_ref(z, k, v, h0, w, cu=cu_t)
    got_g = _grads_fused(z, k, v, h0, w, torch.float32, cu=cu_t.to(DEV), **PLANS[plan])
    for a, b in zip(got_g, ref_g):
        assert _rel(a, b) < 2e-5


@needs_kernels
@pytest.mark.parametrize("plan", FWD_PLANS)
def test_forward_plans_cu_seqlens_and_seq_first_views(plan):
    # every forward plan (incl. the one-launch seq kernel): resets and final states of
    # packed sequences (empty and length-1 ones too), and megatron's seq-first views
    _check_packed_forward(FWD_PLANS[plan])
    T, H, D = PACKED_CU[-1], 2, 8
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, 2, H, 3 * D, generator=gen)
    zs = torch.randn(T, 2, H, D, generator=gen)
    views = (zs.transpose(0, 1), qkv[..., D:2 * D].transpose(0, 1), qkv[..., 2 * D:].transpose(0, 1))
    ref = memory_scan_loop(*(t.double() for t in views))
    out = memory_scan_fused(*(t.to(DEV) for t in views), **FWD_PLANS[plan])
    _check_fwd(out, ref, torch.float32)
    assert out[0].transpose(0, 1).is_contiguous()


# ---------------------------------------------------------------------------------------------
# state handoff, layouts, decode


@needs_kernels
@pytest.mark.parametrize("plan", FWD_PLANS)
def test_state_handoff(plan):
    z, k, v, h0 = _inputs(2, 27, 2, 8, seed=11)
    x = [t.float().to(DEV) for t in (z, k, v)]
    s0 = tuple(s.float().to(DEV) for s in h0)
    opts = FWD_PLANS[plan]
    full = memory_scan_fused(*x, s0, output_final_state=True, **opts)
    cut = 13
    a = memory_scan_fused(*(t[:, :cut] for t in x), s0, output_final_state=True, **opts)
    b = memory_scan_fused(*(t[:, cut:] for t in x), a[2], output_final_state=True, **opts)
    torch.testing.assert_close(torch.cat([a[0], b[0]], 1), full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([a[1], b[1]], 1), full[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[2][0], full[2][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[2][1], full[2][1], rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("plan", PLAN_IDS)
def test_transposed_seq_first_views(plan):
    T, B, H, D = 21, 2, 2, 8
    gen = torch.Generator().manual_seed(5)
    # megatron's [seq, batch, heads, dim]; k and v are slices of one fused projection
    qkv = torch.randn(T, B, H, 3 * D, generator=gen)
    z_sb = torch.randn(T, B, H, D, generator=gen)
    z, k, v = z_sb.transpose(0, 1), qkv[..., D:2 * D].transpose(0, 1), qkv[..., 2 * D:].transpose(0, 1)
    assert not k.is_contiguous()
    ref = memory_scan_loop(z.double(), k.double(), v.double())
    leaves = [t.detach().clone().to(DEV).requires_grad_() for t in (z_sb, qkv)]
    zz = leaves[0].transpose(0, 1)
    kk = leaves[1][..., D:2 * D].transpose(0, 1)
    vv = leaves[1][..., 2 * D:].transpose(0, 1)
    out = memory_scan_fused(zz, kk, vv, **PLANS[plan])
    _check_fwd(out, ref, torch.float32)
    assert out[0].transpose(0, 1).is_contiguous()  # seq-first in, seq-first out
    (out[0].sum() + 2 * out[1].sum()).backward()
    ref_in = [t.double().clone().requires_grad_() for t in (z, k, v)]
    r = memory_scan_loop(*ref_in)
    (r[0].sum() + 2 * r[1].sum()).backward()
    assert _rel(leaves[0].grad.transpose(0, 1), ref_in[0].grad) < 2e-5
    assert _rel(leaves[1].grad[..., D:2 * D].transpose(0, 1), ref_in[1].grad) < 2e-5
    assert _rel(leaves[1].grad[..., 2 * D:].transpose(0, 1), ref_in[2].grad) < 2e-5
    assert leaves[1].grad[..., :D].abs().max() == 0


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_step_matches_scan(dtype):
    B, T, H, D = 2, 6, 2, 12
    z, k, v, h0 = _inputs(B, T, H, D, seed=2)
    x = [t.to(DEV, dtype) for t in (z, k, v)]
    state = tuple(s.float().to(DEV) for s in h0)
    full = memory_scan_fused(*x, state, output_final_state=True)
    outs = []
    for t in range(T):
        ok, ov, state = memory_scan_step(x[0][:, t], x[1][:, t], x[2][:, t], state,
                                         backend="triton")
        assert ok.dtype == dtype and state[0].dtype == torch.float32
        outs.append((ok, ov))
    step_k = torch.stack([o[0] for o in outs], 1)
    step_v = torch.stack([o[1] for o in outs], 1)
    tol = TOL[dtype]
    assert _rel(step_k, full[0]) < tol and _rel(step_v, full[1]) < tol
    assert _rel(state[0], full[2][0]) < 1e-5 and _rel(state[1], full[2][1]) < 1e-5
    # the torch twin's step agrees
    tk, tv, ts = memory_scan_step(x[0][:, 0], x[1][:, 0], x[2][:, 0],
                                  tuple(s.float().to(DEV) for s in h0), backend="torch")
    assert _rel(outs[0][0], tk) < tol


# ---------------------------------------------------------------------------------------------
# forward tile shapes, several chunks and tiles, fp16; the default plan's rule


@needs_kernels
@pytest.mark.parametrize("cfg", [dict(BT=4, CT=8, BH=2, BD=8), dict(BT=2, CT=8, BH=4),
                                 dict(BT=4, CT=8, BH=1, BD=16, prefetch=False)],
                         ids=["BT4-CT8-BH2-BD8", "BT2-CT8-BH4", "BT4-CT8-BH1-BD16-noprefetch"])
def test_forward_tiles(cfg):
    # H=3 heads with BH=2 or 4 leaves masked heads; D=24 is not a power of two; T=45 with CT=8:
    # 6 chunks (the carry launch scans 5 aggregates)
    B, T, H, D = 2, 45, 3, 24
    z, k, v, h0 = _inputs(B, T, H, D, seed=21)
    x = [t.to(DEV, torch.float32) for t in (z, k, v)]
    ref = memory_scan_loop(z, k, v, h0, output_final_state=True)
    out = memory_scan_fused(*x, tuple(s.float().to(DEV) for s in h0), output_final_state=True,
                            fwd=cfg)
    _check_fwd(out, ref, torch.float32)
    # fp16 in and out, no initial state
    x16 = [t.to(torch.float16) for t in x]
    ref16 = memory_scan_loop(*(t.double().cpu() for t in x16), output_final_state=True)
    out16 = memory_scan_fused(*x16, output_final_state=True, fwd=cfg)
    _check_fwd(out16, ref16, torch.float16)


# the sweep's best chunk length per (batch, seq) at bf16, 32 heads x 128 on 132 SMs (H200)
SWEEP_BEST_CT = {(1, 4096): 64, (1, 8192): 64, (1, 16384): 128, (1, 32768): 256,
                 (8, 4096): 256, (8, 8192): 512, (8, 16384): 512, (8, 32768): 512}


def test_default_forward_plan_follows_the_sweep():
    from kernels.memory_scan.fused import _fwd_plan
    for (B, T), ct in SWEEP_BEST_CT.items():
        p = _fwd_plan(B, T, 32, 128, torch.device("cpu"))  # CPU plans for 132 SMs
        if B == 1:
            assert p["kernel"] == "chunk"
            # under 4 programs per SM (1 x 4096): BT 4 with pipelined loads won on the H200
            bt, stages = (4, 3) if T == 4096 else (2, 0)
            assert (p["BH"], p["BT"], p["stages"], p["num_warps"], p["CT"], p["prefetch"]) == (4, bt, stages, 2, ct, True)
        else:  # 256 single-head channel blocks: the one-launch kernel won on the H200 (2026-12-01)
            assert (p["kernel"], p["BH"], p["W"], p["S"], p["num_warps"]) == ("seq", 1, 8, 4, 4)
        forced = _fwd_plan(B, T, 32, 128, torch.device("cpu"), dict(kernel="chunk"))
        assert (forced["kernel"], forced["BH"], forced["CT"]) == ("chunk", 4, ct)
    # 0.8-1.5 single-head blocks per SM (104-197 heads x 128 on 132 SMs): seq over half-width
    # blocks with 16-segment tiles won on the H200 (2026-12-02); below that the chunk plan
    for (B, H), want in {(3, 32): "chunk", (6, 16): "chunk", (13, 8): "chunk", (4, 32): "seq",
                         (8, 16): "seq", (6, 32): "seq", (15, 8): "seq"}.items():
        p = _fwd_plan(B, 4096, H, 128, torch.device("cpu"))
        assert p["kernel"] == want, (B, H)
        if want == "seq":
            assert (p["BH"], p["BD"], p["W"], p["S"], p["num_warps"]) == (1, 64, 16, 4, 4)
    p = _fwd_plan(4, 4096, 32, 128, torch.device("cpu"), dict(W=8))  # options given stay
    assert (p["kernel"], p["BD"], p["W"]) == ("seq", 64, 8)
    # small shapes: tiles shrink to the heads and channels there are
    p = _fwd_plan(2, 37, 2, 8, torch.device("cpu"))
    assert (p["BH"], p["BD"], p["CT"], p["NC"], p["num_warps"]) == (2, 8, 64, 1, 1)
    assert _fwd_plan(1, 100, 2, 8, torch.device("cpu"), dict(CT=8, BT=4))["NC"] == 13


def test_unknown_options_are_refused():
    z = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="forward options"):
        memory_scan_fused(z, z, z, fwd=dict(lbw=2))
    with pytest.raises(ValueError, match="forward kernel must be"):
        memory_scan_fused(z, z, z, fwd=dict(kernel="chunklb"))
    with pytest.raises(ValueError, match="stages=3 is for kernel='chunk' only"):
        memory_scan_fused(z, z, z, fwd=dict(kernel="seq", stages=3))
    with pytest.raises(ValueError, match="backward options"):
        memory_scan_fused(z, z, z, bwd=dict(CT=8))
