"""Compile every Triton launch of kernels/ for sm_90 on a machine without a GPU (run by
tests/test_kernels_sm90.py in a subprocess: TRITON_INTERPRET must be off before triton loads).

The interpreter runs our kernels on CPU but skips the compiler's front end, and it never applies
Triton's argument specialisation: an int argument equal to 1 becomes a constexpr, so e.g.
``NC.to(tl.int64)`` compiles for NC = 8 and fails for NC = 1. Pointers and ints divisible by
16 carry the launcher's divisibility hint too, so the PTX has the vector loads the GPU gets.
Here every public op runs on CPU tensors with JITFunction.run replaced by a recorder; each
recorded launch (specialised the way Triton's launcher would) is then compiled for an H100/H200.
Shapes are chosen to hit the value 1 (batch 1, one head, one chunk, one page). Prints one line
per failure; exit status 1 if any.
"""
from __future__ import annotations

import inspect
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
       torch.int8: "*i8", torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
DIV16 = [["tt.divisibility", 16]]
launches: dict = {}


def _record(self, *args, grid, warmup, **kwargs):
    names = [n for n in self.arg_names if n not in kwargs]
    sig, consts, attrs, ones = {}, {}, {}, []
    for i, name in enumerate(self.arg_names):
        if name in kwargs:
            a = kwargs[name]
        elif names.index(name) < len(args):
            a = args[names.index(name)]
        else:  # a defaulted parameter the launch leaves out
            a = inspect.signature(self.fn).parameters[name].default
        specialise = i not in self.do_not_specialize and name not in self.do_not_specialize
        if name in kwargs or a is None or isinstance(a, bool):
            sig[name], consts[(i,)] = "constexpr", a
        elif isinstance(a, torch.Tensor):
            sig[name] = PTR[a.dtype]
            attrs[(i,)] = DIV16  # a CUDA allocation is 16-byte aligned
        elif isinstance(a, int):
            if a == 1 and specialise:
                sig[name], consts[(i,)] = "constexpr", 1  # what Triton's launcher does with a 1
                ones.append(name)
            else:
                sig[name] = "i64" if abs(a) >= 2**31 else "i32"
                if a % 16 == 0 and specialise:
                    attrs[(i,)] = DIV16  # and with a multiple of 16 (vector loads follow from it)
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{self.__name__}: argument {name} of type {type(a).__name__}")
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if kwargs.get(k) is not None}
    for k in LAUNCH_OPTIONS:
        sig.pop(k, None)
    key = (self.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), tuple(sorted(attrs)),
           tuple(sorted(options.items())))
    launches.setdefault(key, (self, sig, consts, attrs, options, ones))
    return None  # outputs stay uninitialised; only the launches matter


def _calls():
    """Every public op, on shapes full of ones and on an ordinary one."""
    from kernels.memory_scan import fused
    from kernels.sparse import triton_ops as sp

    g = torch.Generator().manual_seed(0)

    def r(*s, dtype=torch.bfloat16):
        return torch.randn(*s, generator=g).to(dtype)

    for B, T, H, D in [(1, 37, 1, 128), (1, 1, 1, 64), (2, 700, 3, 128)]:
        z, k, v = (r(B, T, H, D).requires_grad_() for _ in range(3))
        h0 = (r(B, H, D, dtype=torch.float32), r(B, H, D, dtype=torch.float32))
        yield lambda: fused.memory_scan_fused(z, k, v, output_final_state=True)[0].sum().backward()
        yield lambda: fused.memory_scan_fused(z, k, v, h0, output_final_state=True, fwd=dict(kernel="seq", BH=2))
        yield lambda: fused.memory_scan_fused(z, k, v, fwd=dict(kernel="seq", BH=1, BD=64, W=16))  # the narrow rule's tile
        yield lambda: fused.memory_scan_fused(z, k, v, h0, fwd=dict(kernel="chunk", BH=1, stages=3))
        for schedule in ("chained", "loop"):
            yield lambda: fused.memory_scan_fused(z, k, v, h0, output_final_state=True,
                                                  bwd=dict(schedule=schedule))[0].sum().backward()
        cu = torch.tensor([0, T // 3, T * B], dtype=torch.int32)
        zf, kf, vf = (r(1, B * T, H, D).requires_grad_() for _ in range(3))
        yield lambda: fused.memory_scan_fused(zf, kf, vf, cu_seqlens=cu)[0].sum().backward()
        yield lambda: fused.memory_scan_fused(zf, kf, vf, cu_seqlens=cu, fwd=dict(kernel="seq"))
        yield lambda: fused.memory_scan_step_fused(z[:, 0].detach(), k[:, 0].detach(), v[:, 0].detach(), h0)
    for B, Hq, Hkv, T, D in [(1, 1, 1, 64, 64), (1, 8, 2, 1000, 128), (2, 4, 4, 4096, 128)]:
        q, k, v = r(B, Hq, D), r(B, Hkv, T, D), r(B, Hkv, T, D)
        seq = torch.full((B,), T, dtype=torch.int32)
        for page in (16, 64):
            yield lambda: sp.page_minmax(k, page, seq)
            yield lambda: sp.block_means(k, page, None)
            P = -(-T // page)
            kmin, kmax = r(B, Hkv, P, D), r(B, Hkv, P, D)
            yield lambda: sp.quest_scores(q, kmin, kmax, seq, page)
            pos = torch.full((B,), T - 1, dtype=torch.int64)
            yield lambda: sp.page_minmax_refresh(k, pos, page, kmin, kmax)
            yield lambda: sp.page_minmax(k, page, seq, quant="int8")
            qmin, qmax = kmin.to(torch.int8), kmax.to(torch.int8)
            step = r(B, Hkv, P, dtype=torch.float32)
            yield lambda: sp.page_minmax_refresh(k, pos, page, qmin, qmax, step)
            yield lambda: sp.quest_scores(q, qmin, qmax, seq, page, step)
            yield lambda: sp.quest_scores(q, qmin, qmax, seq, page, step, per_sm=4, stages=3)
            yield lambda: sp.quest_scores(q, kmin, kmax, seq, page, per_sm=4, stages=3)
            yield lambda: sp.block_means_update(kmin.float(), k[:, :, 0], pos, page)
            topk = max(1, P // 4)
            idx = torch.randint(0, P, (B, Hkv, topk), generator=g).to(torch.int32)
            yield lambda: sp.block_sparse_decode(q, k, v, idx, page, seq)
            yield lambda: sp.quest_scores(q, kmin, kmax, seq, page, pages_first=True)
            yield lambda: sp.block_sparse_decode(q, k, v, idx, page, seq, cfg=dict(splits_first=True))
            yield lambda: sp.block_sparse_decode(q, k, v, idx, page)
            yield lambda: sp.select_topk(r(B, Hq, P, dtype=torch.float32), topk)
            yield lambda: sp.quest_select(q, kmin, kmax, topk, seq, page, True)
            yield lambda: sp.moba_gate_topk(r(B, Hq, 1, D), kmin.float(), page, topk,
                                            torch.tensor([T - 1]))
        yield lambda: sp.dilated_decode(q, k, v, 8, 32, 4, seq)
        yield lambda: sp.snapkv_votes(r(B, Hq, 32, D), k)
        qp = r(B, Hq, T, D)
        yield lambda: sp.moba_prefill(qp, k, v, 64, 3)


def main() -> int:
    JITFunction.run = _record
    for call in _calls():
        try:
            call()
        except Exception:  # uninitialised outputs may upset a wrapper after its launch: keep going
            pass
    failures = 0
    for (name, *_), (fn, sig, consts, attrs, options, ones) in launches.items():
        try:
            triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET, options=options)
        except Exception as e:  # noqa: BLE001 - report every kernel, not just the first
            failures += 1
            last = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
            print(f"FAIL {name} (ints equal to 1: {', '.join(ones) or 'none'}): {last[-1]}")
            if os.environ.get("SM90_TRACE"):
                traceback.print_exc()
    kernels = sorted({k[0] for k in launches})
    print(f"compiled {len(launches) - failures}/{len(launches)} launches of {len(kernels)} kernels: {', '.join(kernels)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
