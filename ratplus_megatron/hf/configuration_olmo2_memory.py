"""Configuration of OLMo2 with the RAT+ exponentially decaying memory.

Self-contained on purpose (imports only `transformers`): `save_pretrained` copies this file next to the
weights so that `AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without our package.
"""
from huggingface_hub.dataclasses import strict  # a dependency of transformers
from transformers import Olmo2Config


@strict
class Olmo2MemoryConfig(Olmo2Config):
    r"""[`Olmo2Config`] plus the decaying memory of RAT+ (arXiv 2602.18196).

    Args:
        memory (`bool`, defaults to `True`):
            Per attention layer, replace keys and values (after OLMo2's k-norm, before RoPE) by
            `k~_t = g_t k~_{t-1} + (1 - g_t) k_t` (same gate for values), with
            `g_t = sigmoid(g_proj(h_t))` in fp32 and one gate per key/value channel. With `False` (and
            `memory_output_gate=False`) the model is exactly `Olmo2ForCausalLM`.
        memory_gate_bias (`bool`, defaults to `False`):
            Whether `self_attn.g_proj` has a bias (e.g. for a near-identity start: a large negative bias
            makes g ~ 0, i.e. k~ ~ k).
        memory_output_gate (`bool`, defaults to `False`):
            RAT+'s output gate: the attention output (before `o_proj`) is multiplied by
            `sigmoid(og_proj(h))`, `og_proj` a bias-free linear hidden -> heads * head_dim.
    """

    model_type = "olmo2_memory"
    # g_proj / og_proj read the replicated residual stream like q/k/v: same tensor-parallel plan.
    base_model_tp_plan = {
        **Olmo2Config.base_model_tp_plan,
        "layers.*.self_attn.g_proj": "colwise_gather_output",
        "layers.*.self_attn.og_proj": "colwise_gather_output",
    }

    memory: bool = True
    memory_gate_bias: bool = False
    memory_output_gate: bool = False


__all__ = ["Olmo2MemoryConfig"]
