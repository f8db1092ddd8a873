"""OLMo2 with the RAT+ exponentially decaying memory, as a `transformers` model.

Per attention layer (see `Olmo2MemoryConfig`), from the residual stream h (OLMo2 has no pre-norm):

    q = q_norm(q_proj(h)),  k = k_norm(k_proj(h)),  v = v_proj(h)      (OLMo2, norms over full width)
    g_t  = sigmoid(g_proj(h_t))                                         (logits upcast, sigmoid in fp32)
    k~_t = g_t * k~_{t-1} + (1 - g_t) * k_t,   v~_t = g_t * v~_{t-1} + (1 - g_t) * v_t,   k~_{-1} = v~_{-1} = 0
    out  = o_proj(attention(RoPE(q), RoPE(k~), v~) [* sigmoid(og_proj(h)) if memory_output_gate])

`g_proj` runs in the model dtype like q/k/v; the scan itself runs in fp32 and returns k~, v~ in the model
dtype. With `memory=False` and `memory_output_gate=False` the computation is exactly `Olmo2ForCausalLM`.

KV cache (`Olmo2MemoryCache`): per layer the post-RoPE k~ and the v~ the attention reads (like a
`DynamicCache`), plus the recurrent state: the last pre-RoPE (k~, v~), fp32, [batch, kv_heads, head_dim].
A forward with a cache continues the recurrence from that state: one token goes through
`memory_scan_step`, several tokens (prefill, chunked prefill) through `memory_scan(initial_state=...)`.

Padding: where a 2D `attention_mask` is 0 the token is skipped by the memory (gate forced to 1, its k/v
to 0): the state passes through it unchanged. Left padding (batched `generate`), right padding and holes
are therefore exact. Packed sequences (several documents in one row via `position_ids`) are not supported:
the memory would run across document boundaries. A 4D `attention_mask` is used by the attention only.

Not supported: StaticCache / `cache_implementation="static"` and hence compiled decoding (the attention
raises a TypeError for a cache without the memory state), cropping the cache (assisted or speculative
decoding: the recurrence cannot be rolled back), flash-attention varlen packing.

The scan comes from our `kernels` package (Triton on CUDA, torch otherwise). When that package is not
importable (this file copied next to a checkpoint and loaded with `trust_remote_code=True` elsewhere), the
small torch scan below is used instead; it computes the same equations.

Imports only torch and transformers (plus the configuration file next to it), so that `save_pretrained`
can copy it as remote code.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Olmo2ForCausalLM, Olmo2Model
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.olmo2.modeling_olmo2 import (
    Olmo2Attention,
    Olmo2DecoderLayer,
    Olmo2PreTrainedModel,
    Olmo2RMSNorm,
    Olmo2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_olmo2_memory import Olmo2MemoryConfig

MemoryState = tuple[torch.Tensor, torch.Tensor]

# Gate logit given to padding tokens: sigmoid(1e4) == 1 exactly in fp32 and fp64, so the state passes
# through unchanged (their k/v are also zeroed, so 0 * k never meets a NaN from a fully masked row).
PAD_GATE_LOGIT = 1e4


# ----------------------------------------------------------------------------------------------------
# The scan: our kernels when importable, else a torch fallback of the same equations
# ----------------------------------------------------------------------------------------------------

def torch_memory_scan(g_logits, k, v, initial_state: MemoryState | None = None, cu_seqlens=None,
                      output_final_state: bool = False):
    """Fallback of `kernels.memory_scan` (no `cu_seqlens`): [batch, seq, heads, dim] in, fp32 inside.

    Doubling scan: after the step of width s, h_t = sum over the last 2s inputs b_j weighted by the
    product of the gates a after j; log2(seq) steps, no Python loop over time.
    """
    if cu_seqlens is not None:
        raise NotImplementedError("the torch fallback scan does not take cu_seqlens; install `kernels`")
    g = torch.sigmoid(g_logits.float())
    outs, finals = [], []
    for i, x in enumerate((k, v)):
        a, h = g, (1 - g) * x.float()
        if initial_state is not None:  # the state only enters at t = 0: h_0 = g_0 * s + (1 - g_0) x_0
            h = torch.cat([h[:, :1] + g[:, :1] * initial_state[i].float()[:, None], h[:, 1:]], dim=1)
        step = 1
        while step < h.shape[1]:
            h = torch.cat([h[:, :step], h[:, step:] + a[:, step:] * h[:, :-step]], dim=1)
            a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
            step *= 2
        outs.append(h.to(x.dtype))
        finals.append(h[:, -1])
    if output_final_state:
        return outs[0], outs[1], (finals[0], finals[1])
    return outs[0], outs[1]


def torch_memory_scan_step(g_logits, k, v, state: MemoryState):
    """Fallback of `kernels.memory_scan_step`: inputs [batch, heads, dim]; returns (k~_t, v~_t, new_state)."""
    g = torch.sigmoid(g_logits.float())
    k_state, v_state = (g * s.float() + (1 - g) * x.float() for s, x in zip(state, (k, v)))
    return k_state.to(k.dtype), v_state.to(v.dtype), (k_state, v_state)


try:
    from kernels import memory_scan, memory_scan_step
    MEMORY_SCAN_FROM_KERNELS = True
except ImportError:
    memory_scan, memory_scan_step = torch_memory_scan, torch_memory_scan_step
    MEMORY_SCAN_FROM_KERNELS = False


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------

class Olmo2MemoryCacheLayer(DynamicLayer):
    """A `DynamicLayer` (keys: post-RoPE k~, values: v~, [batch, kv_heads, seq, head_dim]) plus the
    recurrent state `memory_state` = (k~, v~) of the last token, pre-RoPE, fp32, [batch, kv_heads, head_dim]."""

    is_croppable = False  # the recurrence cannot be rolled back

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.memory_state: MemoryState | None = None

    def _map_state(self, fn):
        if self.memory_state is not None:
            self.memory_state = tuple(fn(s) for s in self.memory_state)

    def reset(self) -> None:
        super().reset()
        self.memory_state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_state(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_state(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_state(lambda s: s[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        # positive values: legacy "crop to this absolute length"
        removed = tokens_to_remove if tokens_to_remove <= 0 else max(self.get_seq_length() - tokens_to_remove, 0)
        if removed != 0 and self.memory_state is not None:
            raise NotImplementedError("Olmo2MemoryCache cannot be cropped: the recurrent memory state "
                                      "cannot be rolled back (assisted decoding is not supported)")
        super().crop(tokens_to_remove)

    def offload(self):
        super().offload()
        self._map_state(lambda s: s.to("cpu", non_blocking=True))

    def prefetch(self):
        super().prefetch()
        if self.is_initialized:
            self._map_state(lambda s: s.to(self.device, non_blocking=True))


class Olmo2MemoryCache(DynamicCache):
    """KV cache of `Olmo2MemoryForCausalLM`: per layer the k~ (post-RoPE) and v~ that attention reads,
    and the recurrent state that continues the memory.

    Accessors for evaluators (layer_idx in [0, num_hidden_layers)):
      - `get_layer_keys(i)`   -> k~ after RoPE, [batch, kv_heads, seq, head_dim], model dtype (None if empty)
      - `get_layer_values(i)` -> v~,            [batch, kv_heads, seq, head_dim]
      - `get_memory_state(i)` -> (k~, v~) of the last token before RoPE, fp32, [batch, kv_heads, head_dim]
      - `set_layer_keys_values(i, keys, values)` replaces what attention will read (e.g. a compressed
        cache); the memory state is left alone.
      - `set_memory_state(i, state)`.
    Attention over the cache itself can be swapped with `transformers.AttentionInterface.register(name, fn)`
    and `model.set_attn_implementation(name)`; `fn(module, query, key, value, attention_mask, **kw)`
    receives the full cached k~/v~ and `module.layer_idx`.
    """

    def __init__(self, config=None, offloading: bool = False):
        num_layers = None if config is None else config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is None:  # layers are appended lazily, as in a DynamicCache built without config
            Cache.__init__(self, layer_class_to_replicate=Olmo2MemoryCacheLayer, offloading=offloading)
        else:
            Cache.__init__(self, layers=[Olmo2MemoryCacheLayer() for _ in range(num_layers)],
                           offloading=offloading)

    def _layer(self, layer_idx: int) -> Olmo2MemoryCacheLayer:
        while self.layer_class_to_replicate is not None and len(self.layers) <= layer_idx:
            self.layers.append(self.layer_class_to_replicate())
        return self.layers[layer_idx]

    def get_layer_keys(self, layer_idx: int) -> torch.Tensor | None:
        layer = self._layer(layer_idx)
        return layer.keys if layer.get_seq_length() > 0 else None

    def get_layer_values(self, layer_idx: int) -> torch.Tensor | None:
        layer = self._layer(layer_idx)
        return layer.values if layer.get_seq_length() > 0 else None

    def set_layer_keys_values(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        layer = self._layer(layer_idx)
        if not layer.is_initialized:
            layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values

    def get_memory_state(self, layer_idx: int) -> MemoryState | None:
        return self._layer(layer_idx).memory_state

    def set_memory_state(self, layer_idx: int, state: MemoryState) -> None:
        self._layer(layer_idx).memory_state = tuple(state)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------

class Olmo2MemoryAttention(Olmo2Attention):
    """`Olmo2Attention` plus the decaying memory on k and v (gate `g_proj`) and the optional output gate."""

    def __init__(self, config: Olmo2MemoryConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.memory:
            self.g_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim,
                                    bias=config.memory_gate_bias)
        if config.memory_output_gate:
            self.og_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)

    def apply_memory(self, hidden_states, key_states, value_states, past_key_values=None,
                     memory_token_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [batch, seq, kv_heads, head_dim] (k after k-norm, before RoPE) -> k~, v~; updates the cache's state."""
        g_logits = self.g_proj(hidden_states).float().view(key_states.shape)
        if memory_token_mask is not None:  # [batch, seq], False = padding: the memory skips the token
            pad = ~memory_token_mask.to(torch.bool)[:, :, None, None]
            g_logits = g_logits.masked_fill(pad, PAD_GATE_LOGIT)
            key_states, value_states = key_states.masked_fill(pad, 0), value_states.masked_fill(pad, 0)
        if past_key_values is None:
            return memory_scan(g_logits, key_states, value_states)
        # duck-typed: a copy of this file loaded as remote code has its own Olmo2MemoryCache class
        if not hasattr(past_key_values, "get_memory_state"):
            raise TypeError(f"the memory model needs an Olmo2MemoryCache (it carries the recurrent state), "
                            f"got {type(past_key_values).__name__}")
        state = past_key_values.get_memory_state(self.layer_idx)
        if state is not None and key_states.shape[1] == 1:  # decoding: one step of the recurrence
            k, v, state = memory_scan_step(g_logits[:, 0], key_states[:, 0], value_states[:, 0], state)
            k, v = k[:, None], v[:, None]
        else:  # prefill or a chunk after a cache
            k, v, state = memory_scan(g_logits, key_states, value_states, initial_state=state,
                                      output_final_state=True)
        past_key_values.set_memory_state(self.layer_idx, state)
        return k, v

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                memory_token_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_norm(self.q_proj(hidden_states)).view(hidden_shape)
        key_states = self.k_norm(self.k_proj(hidden_states)).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape)
        if self.config.memory:
            key_states, value_states = self.apply_memory(hidden_states, key_states, value_states,
                                                         past_key_values, memory_token_mask)
        query_states, key_states, value_states = (x.transpose(1, 2) for x in (query_states, key_states, value_states))

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if self.config.memory_output_gate:
            attn_output = attn_output * torch.sigmoid(self.og_proj(hidden_states))
        return self.o_proj(attn_output), attn_weights


class Olmo2MemoryDecoderLayer(Olmo2DecoderLayer):
    def __init__(self, config: Olmo2MemoryConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = Olmo2MemoryAttention(config, layer_idx)


class Olmo2MemoryPreTrainedModel(Olmo2PreTrainedModel):
    config_class = Olmo2MemoryConfig
    config: Olmo2MemoryConfig
    _no_split_modules = ["Olmo2MemoryDecoderLayer"]


class Olmo2MemoryModel(Olmo2MemoryPreTrainedModel, Olmo2Model):
    """`Olmo2Model` with memory attention; creates an `Olmo2MemoryCache` and tells the memory about padding."""

    def __init__(self, config: Olmo2MemoryConfig):
        Olmo2MemoryPreTrainedModel.__init__(self, config)  # Olmo2Model's own layers are not built
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(Olmo2MemoryDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Olmo2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Olmo2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and past_key_values is None and not (self.gradient_checkpointing and self.training):
            past_key_values = Olmo2MemoryCache(config=self.config)
        if self.config.memory and attention_mask is not None and attention_mask.dim() == 2:
            seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            token_mask = attention_mask[:, -seq_len:].to(torch.bool)
            if not bool(token_mask.all()):
                kwargs["memory_token_mask"] = token_mask
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                               use_cache=use_cache, **kwargs)


class Olmo2MemoryForCausalLM(Olmo2MemoryPreTrainedModel, Olmo2ForCausalLM):
    """`Olmo2ForCausalLM` with the decaying memory; `generate` uses an `Olmo2MemoryCache`."""

    def __init__(self, config: Olmo2MemoryConfig):
        Olmo2MemoryPreTrainedModel.__init__(self, config)
        self.model = Olmo2MemoryModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        # replace the plain DynamicCache generate builds by default (a user-supplied cache is left alone)
        if type(model_kwargs.get("past_key_values")) is DynamicCache:
            cache = model_kwargs["past_key_values"]
            model_kwargs["past_key_values"] = Olmo2MemoryCache(config=self.config, offloading=cache.offloading)


__all__ = [
    "Olmo2MemoryAttention",
    "Olmo2MemoryCache",
    "Olmo2MemoryCacheLayer",
    "Olmo2MemoryDecoderLayer",
    "Olmo2MemoryForCausalLM",
    "Olmo2MemoryModel",
    "Olmo2MemoryPreTrainedModel",
    "torch_memory_scan",
    "torch_memory_scan_step",
]
