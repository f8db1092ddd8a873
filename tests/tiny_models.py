"""Helpers for tests on tiny random HF models."""
import math

import torch


def init_unit_scale_(model) -> None:
    """Re-draw a tiny model's weights so activations and logits are O(1).

    With the default 0.02 init every logit of a tiny model is ~0, and padding or cache bugs hide
    behind that. Norm weights in [0.5, 1.5], embeddings N(0, 1), linears with unit gain; the memory
    gate (g_proj) and the output gate (og_proj) get gain 2 so their logits spread (std ~2).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                gain = 2.0 if (".g_proj." in name or ".og_proj." in name) else 1.0
                p.normal_(0.0, gain / math.sqrt(p.shape[-1]) if p.dim() == 2 else gain)
