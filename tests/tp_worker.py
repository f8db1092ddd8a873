"""torchrun worker for test_tensor_parallel: load a TP=1 checkpoint at TP x PP, compare with TP=1.

Usage: torchrun --standalone --nproc-per-node TPxPP tests/tp_worker.py CASE_DIR
CASE_DIR holds case.json (model config), ckpt/ (dist checkpoint saved at TP=1) and ref.pt
(inputs, logits and full-layout gradients at TP=1). Rank 0 writes result.json.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_common import build, full_gradients, logits_and_grads  # noqa: E402


def main(case_dir: Path):
    import faulthandler
    faulthandler.dump_traceback_later(240, exit=True)  # a hang shows its stack, not a timeout
    case = json.loads((case_dir / "case.json").read_text())
    from megatron.core import dist_checkpointing
    from ratplus_megatron.parallel import init_parallel, sum_tp_replicated_grads

    init_parallel(tp=case["tp"], pp=case.get("pp", 1))
    model = build(case)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(case_dir / "ckpt"))
    model.load_state_dict(state, strict=False)
    ref = torch.load(case_dir / "ref.pt")
    logits = logits_and_grads(model, ref["ids"], ref["proj"])
    sum_tp_replicated_grads(model, model.config)  # megatron's finalize_model_grads rule, as on GPU
    grads = full_gradients(model)
    result = {"logits_err": (logits - ref["logits"]).abs().max().item(), "grad_err": {}}
    for name, g in grads.items():
        r = ref["grads"][name]
        result["grad_err"][name] = ((g - r).norm() / r.norm().clamp_min(1e-12)).item()
    if torch.distributed.get_rank() == 0:
        (case_dir / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
