"""CPU toy: when does a small model of ours learn to copy, and how does context length delay it?

    python bench/replication/copy_toy.py --steps 800 --filler 768 --switch 500 --out /tmp/copy.json

Each sequence is [filler] + a list of K random 7-digit numbers (tiny-bpe tokens, ", "-joined) +
the same list again. The filler is random token ids; with --switch S it is absent for the first S
steps (the short-context curriculum) and --filler tokens long afterwards. The model is our megatron
OLMo2 model (2 layers, d 128, 4 heads x 32, fp32, CPU), trained by a plain AdamW loop; every 25 steps
it prints the loss on the list's first copy (not predictable) and on its second copy after the
first token (predictable only by copying, ~0 once an induction circuit works). Replication README,
"Context length delays copying", has the measured runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--filler", type=int, default=0, help="random tokens before the list")
    p.add_argument("--switch", type=int, default=0, help="no filler before this step (curriculum)")
    p.add_argument("--items", type=int, default=12, help="numbers per list")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--theta", type=float, default=1e4, help="RoPE base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the loss curve here (JSON)")
    a = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from ratplus_megatron.config import preset
    from ratplus_megatron.model import build_model, to_transformer_config
    from ratplus_megatron.parallel import init_parallel

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_parallel(tp=1, pp=1, seed=1234)
    tok = AutoTokenizer.from_pretrained(str(REPO / "data_prep/assets/tiny-bpe"))
    vocab = 2048
    cfg = preset("tiny", num_layers=2, hidden_size=128, num_attention_heads=4, num_kv_heads=4, head_dim=32,
                 ffn_hidden_size=256, vocab_size=vocab, max_position_embeddings=4096, rope_theta=a.theta)
    torch.manual_seed(a.seed)
    model = build_model(cfg, to_transformer_config(cfg), use_te=False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rng = random.Random(a.seed)
    curve, t0 = [], time.time()
    for step in range(a.steps):
        lists = [tok(" " + ", ".join(str(rng.randrange(10**6, 10**7)) for _ in range(a.items)) + ".",
                     add_special_tokens=False)["input_ids"] for _ in range(a.batch)]
        width = max(len(x) for x in lists)
        ids = torch.zeros(a.batch, 2 * width, dtype=torch.long)
        copy = torch.zeros(a.batch, 2 * width)  # labels on the second copy, after its first token
        for i, x in enumerate(lists):
            ids[i, :2 * len(x)] = torch.tensor(x + x)
            copy[i, len(x) + 1:2 * len(x)] = 1
        filler = a.filler if step >= a.switch else 0
        if filler:
            ids = torch.cat([torch.randint(2, vocab, (a.batch, filler)), ids], 1)
            copy = torch.cat([torch.zeros(a.batch, filler), copy], 1)
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        logits = model(ids, pos, None)
        per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1),
                                  reduction="none").view(a.batch, -1)
        second = copy[:, 1:].bool()
        first = torch.zeros_like(second)
        first[:, filler:] = ~second[:, filler:]
        loss = per_tok.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == a.steps - 1:
            row = {"step": step, "filler": filler, "first_copy_loss": round(per_tok[first].mean().item(), 4),
                   "second_copy_loss": round(per_tok[second].mean().item(), 4), "seconds": round(time.time() - t0)}
            curve.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "curve": curve}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
