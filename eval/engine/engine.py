"""Batched greedy decoding over HF causal LMs with sparse attention swapped in.

How it works
    A custom attention function is registered with ``transformers.AttentionInterface`` under the
    name ``niah_sparse`` and selected with ``model.set_attn_implementation``. The model still
    projects q/k/v (and, for the memory model, runs its memory scan and keeps the recurrent
    state in its own cache); our function receives the new tokens' q and cached k/v and:

    * appends k/v to the engine's own per-layer buffers ([B, Hkv, L, D], right-padded: row i holds
      its own n_i valid tokens) and empties the HF cache layer again, so K/V are stored once;
    * prefill (several query tokens): dense causal attention (quest, random, snapkv, dense),
      MoBA's per-token block attention (``moba_prefill``) or RAT+'s dilated mask (dilated); then
      builds the selector's metadata (Quest page min/max, MoBA block means) or compresses the
      cache (SnapKV);
    * decoding (one query token): brings the metadata of the new key's page/block up to date
      (``page_minmax_refresh`` / ``block_means_update``, O(page) per step), selects, and calls
      ``block_sparse_decode`` / ``dilated_decode`` / dense decoding on the buffers.

    Prompts are right-padded; every kernel gets each row's valid length (``seq_len``), and
    positions (RoPE) are passed explicitly, so rows of different lengths are exact. Logits are
    computed only at the positions that are decoded (no [T, vocab] tensor at long contexts).

Decoding modes (``generate(decode=...)``): ``eager`` slices the buffers to the current length each
step; ``static`` keeps every shape fixed (full-capacity buffers, each row masked by its length,
state updated in place) so that ``graph`` can capture one decode forward in a CUDA graph and replay
it. A step's launches bake in a few host integers (the number of blocks to select, RAT+'s chunk:
``_step_params``); the graph is captured again when they change (at a fractional budget, once per
budget x block tokens). HF's eager forward launches thousands of small kernels per token, so on a
slow host the graph decides the decode speed.

Memory models (``Olmo2MemoryForCausalLM``): the cached k~ (post-RoPE) and v~ are the "mem"
source. The "plain" source is captured by wrapping each attention module's ``apply_memory``: its
inputs are k = k_norm(k_proj(h)) (before RoPE, which we then apply with the model's rotary
embedding at the same positions) and v = v_proj(h). For stock models the cache is "plain".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kernels.sparse as ks

from .select import moba_select, quest_select, random_select, snapkv_keep
from .spec import KVSource, MethodSpec, SpecError

ATTN_NAME = "niah_sparse"
_ACTIVE: "_Run | None" = None  # the generation the registered attention function serves


def is_memory_model(model) -> bool:
    return bool(getattr(model.config, "memory", False)) and any(
        hasattr(m, "apply_memory") for m in model.modules())


def default_source(model) -> KVSource:
    return KVSource("mem", "mem") if is_memory_model(model) else KVSource("plain", "plain")


def _rope(x, cos, sin):
    """RoPE on x [B, H, T, D] exactly as the memory model (an OLMo2) applies it to q and k~."""
    from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, x, cos, sin)[1]


# ------------------------------------------------------------------------------------ run state


@dataclass
class _Layer:
    """One layer's K/V buffers (compute source and, if different, selection keys) and metadata."""

    kc: torch.Tensor  # [B, Hkv, L, D] compute keys
    vc: torch.Tensor  # [B, Hkv, L, D] compute values
    ks: torch.Tensor  # [B, Hkv, L, D] selection keys (may be kc itself)
    meta: tuple = ()  # quest: (kmin, kmax[, int8 step]); moba: (kmeans,)
    n: torch.Tensor | None = None  # per-row valid length of this layer's buffers (SnapKV shrinks it)
    n_max: int = 0  # max(n) after the prompt, on the host: reading it from n would sync every layer


@dataclass
class _Run:
    spec: MethodSpec
    model: object
    cache: object
    capacity: int  # buffer length L
    lengths: torch.Tensor  # [B] prompt lengths
    positions: torch.Tensor  # [B, Tq] positions of the current forward's tokens
    memory: bool
    generator: torch.Generator | None = None
    static: bool = False  # fixed shapes (decode modes static and graph)
    step: int = 0  # decoding forwards so far, the current one included
    layers: dict = field(default_factory=dict)
    captured: dict = field(default_factory=dict)  # layer -> pre-scan (k, v), [B, T, H, D]
    rope: tuple | None = None  # (cos, sin) of the current forward, for plain keys of memory models

    # -------------------------------------------------------------------------- K/V sources

    def _plain(self, module, key, value):
        """Plain K (post-RoPE) and V of the new tokens, [B, Hkv, Tq, D]."""
        if not self.memory:
            return key, value
        k, v = self.captured.pop(module.layer_idx)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.rope is None:
            decoder = self.model.get_decoder()
            self.rope = decoder.rotary_emb(v, self.positions)
        cos, sin = self.rope
        return _rope(k, cos, sin), v

    def new_kv(self, module, key, value):
        """(compute k, compute v, selection k) of the new tokens."""
        src = self.spec.source
        plain = self._plain(module, key, value) if (src.uses_plain and self.memory) else (key, value)
        mem = (key, value)
        kc, vc = plain if src.compute == "plain" else mem
        ksel = plain[0] if src.selection == "plain" else mem[0]
        return kc, vc, ksel

    # -------------------------------------------------------------------------- buffers

    def _empty_hf_layer(self, i):
        # fresh empty tensors: a [:, :, :0] view would keep the whole prompt's K/V alive until the
        # layer's next update (twice the KV memory after prefill: out of memory at 7B x 128K)
        layer = self.cache.layers[i]
        layer.keys = layer.keys.new_empty((*layer.keys.shape[:2], 0, layer.keys.shape[-1]))
        layer.values = layer.values.new_empty((*layer.values.shape[:2], 0, layer.values.shape[-1]))


# ------------------------------------------------------------------------------------ attention


def _sdpa(q, k, v, scale, causal=True, mask=None):
    """torch SDPA (GQA without copying K/V); causal when no mask is given."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _dilated_prefill(q, k, v, scale, chunk, window, prefix, rows=2048):
    """Causal attention restricted to RAT+'s dilated pattern, queries in slices (bounded memory).
    A slice gathers only the keys it may attend: the prefix, the chunk ends before its window, and
    its window and itself; about T / chunk keys instead of T."""
    T = q.shape[2]
    if chunk == 1 and window == 0 and prefix == 0:
        return _sdpa(q, k, v, scale)
    dev = q.device
    out = torch.empty_like(q)
    first_end = prefix + (chunk - 1 - prefix) % chunk  # the first chunk end at or past the prefix
    for s0 in range(0, T, rows):
        s1 = min(T, s0 + rows)
        lo = max(0, s0 - window)  # every key from here on is a candidate of some row of the slice
        keys = torch.cat([torch.arange(min(prefix, lo), device=dev),
                          torch.arange(first_end, max(first_end, lo), chunk, device=dev),
                          torch.arange(lo, s1, device=dev)])
        mask = ks.dilated_mask(torch.arange(s0, s1, device=dev), s1, chunk, window, prefix, keys=keys)
        kk, vv = (k[:, :, :s1], v[:, :, :s1]) if keys.numel() == s1 else (k[:, :, keys], v[:, :, keys])
        out[:, :, s0:s1] = _sdpa(q[:, :, s0:s1], kk, vv, scale, mask=mask[None, None])
    return out


def _dense_decode(q, k, v, n, scale):
    """q [B, Hq, D] over keys < n ([B]); torch SDPA with a key mask (the dense reference)."""
    T = k.shape[2]
    mask = (torch.arange(T, device=q.device)[None, :] < n[:, None])[:, None, None, :]
    return _sdpa(q[:, :, None], k, v, scale, causal=False, mask=mask)[:, :, 0]


def _step_params(spec, T: int) -> tuple:
    """The host integers a decoding step at context T (the longest row) passes to its kernels; a
    captured step is valid while they stay the same."""
    m = spec.method
    if m in ("quest", "moba", "random"):
        return (spec.blocks_at(T, spec.block),)
    if m == "dilated":
        return (spec.dilated_chunk(T),)
    return ()


def _update_meta(spec, layer: _Layer, n):
    """Bring the metadata of each row's page/block holding its new selection key (at position
    n - 1) up to date, in place: ``page_minmax_refresh`` (Quest: the page recomputed from the
    cache, O(page * D)) or ``block_means_update`` (MoBA: the key folded into the running mean,
    O(D)); equal to recomputing the metadata over the cache (the tests check it against that)."""
    pos = n - 1
    if spec.method == "quest":
        ks.page_minmax_refresh(layer.ks, pos, spec.page_size, *layer.meta)
    else:
        k_new = layer.ks[torch.arange(n.shape[0], device=n.device), :, pos]  # [B, Hkv, D]
        ks.block_means_update(layer.meta[0], k_new, pos, spec.moba_block)


def _build_meta(spec, layer: _Layer, layer_idx: int):
    n = layer.n
    T = layer.n_max
    if spec.method == "quest" and layer_idx >= spec.quest_dense_layers:
        bounds = ks.page_minmax(layer.ks[:, :, :T], spec.page_size, seq_len=n,
                                quant=None if spec.quest_bounds == "exact" else spec.quest_bounds)
        P = layer.ks.shape[2] // spec.page_size
        full = []  # over the whole buffer: decoding refreshes pages past the prompt in place
        for x in bounds:
            f = x.new_zeros((*x.shape[:2], P, *x.shape[3:]))
            f[:, :, : x.shape[2]] = x
            full.append(f)
        layer.meta = tuple(full)
    elif spec.method == "moba":
        means = ks.block_means(layer.ks[:, :, :T], spec.moba_block, seq_len=n)
        NB = layer.ks.shape[2] // spec.moba_block
        full = means.new_zeros((*means.shape[:2], NB, means.shape[-1]))
        full[:, :, : means.shape[2]] = means
        layer.meta = (full,)


def _snapkv_compress(spec, run: _Run, layer: _Layer, query, scale):
    """Keep top C - W prompt tokens (by window votes) + the window, per row and KV head (or, with
    ``per_query_head``, per query head: K/V are repeated to Hq heads first, as the original SnapKV
    does, so the kept cache has Hq heads and decoding appends each new token to every head)."""
    B, Hkv, L, D = layer.kc.shape
    G = query.shape[1] // Hkv if spec.per_query_head else 1
    H = Hkv * G
    n = layer.n
    lengths = n.tolist()  # once per layer at the prompt
    kept = max(min(nb, spec.snap_capacity(nb)) for nb in lengths)
    L = kept + L - layer.n_max  # room for the tokens still to decode; fixed-shape decoding reads it all
    kc = layer.kc.new_zeros((B, H, L, D))
    vc = layer.vc.new_zeros((B, H, L, D))
    new_n = n.clone()
    W = spec.snap_window
    for b, nb in enumerate(lengths):
        cap = spec.snap_capacity(nb)
        kb, vb = layer.kc[b], layer.vc[b]
        if G > 1:
            kb, vb = kb.repeat_interleave(G, 0), vb.repeat_interleave(G, 0)  # query head h reads h // G
        if nb <= cap:
            kc[b, :, :nb], vc[b, :, :nb] = kb[:, :nb], vb[:, :nb]
            continue
        q_win = query[b : b + 1, :, nb - W : nb]
        keep = snapkv_keep(q_win, layer.ks[b : b + 1, :, :nb], cap, spec.snap_kernel, spec.snap_pool, scale,
                           spec.per_query_head)  # [H, C]
        g = keep[:, :, None].expand(H, keep.shape[1], D)
        kc[b, :, : keep.shape[1]] = kb.gather(1, g)
        vc[b, :, : keep.shape[1]] = vb.gather(1, g)
        new_n[b] = keep.shape[1]
    layer.kc, layer.vc, layer.ks, layer.n, layer.n_max = kc, vc, kc, new_n, kept


def sparse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function. query [B, Hq, Tq, D]; key/value: the new tokens' cached
    k/v [B, Hkv, Tq, D] (the HF cache is emptied after each call). Returns ([B, Tq, Hq, D], None)."""
    run = _ACTIVE
    if run is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' called outside eval.engine generation")
    spec, i = run.spec, module.layer_idx
    B, Hq, Tq, D = query.shape
    scale = scaling if scaling is not None else D ** -0.5
    kc_new, vc_new, ks_new = run.new_kv(module, key, value)
    run._empty_hf_layer(i)

    if i not in run.layers:  # prefill: the buffers start here
        if Tq == 1:
            raise RuntimeError("first forward of a generation must be the prompt")
        L = run.capacity
        shape = (B, kc_new.shape[1], L, D)
        kc, vc = kc_new.new_zeros(shape), vc_new.new_zeros(shape)
        kc[:, :, :Tq], vc[:, :, :Tq] = kc_new, vc_new
        if ks_new is kc_new:
            ksel = kc
        else:
            ksel = ks_new.new_zeros(shape)
            ksel[:, :, :Tq] = ks_new
        layer = run.layers[i] = _Layer(kc, vc, ksel, n=run.lengths.clone(), n_max=Tq)  # prompts padded to Tq
        qk, qv = kc[:, :, :Tq], vc[:, :, :Tq]
        if spec.method == "moba":
            topk = spec.blocks_at(layer.n_max, spec.moba_block)
            out = ks.moba_prefill(query, qk, qv, spec.moba_block, topk, scale=scale)
        elif spec.method == "dilated":
            out = _dilated_prefill(query, qk, qv, scale, spec.dilated_chunk(layer.n_max),
                                   spec.dilated_window, spec.dilated_prefix)
        else:
            out = _sdpa(query, qk, qv, scale)
        if spec.method == "snapkv":
            _snapkv_compress(spec, run, layer, query, scale)
        _build_meta(spec, layer, i)
        return out.transpose(1, 2).contiguous(), None

    # decoding: one new token per row, appended at the row's own position
    if Tq != 1:
        raise RuntimeError("after the prompt, decode one token at a time")
    layer = run.layers[i]
    layer.n.add_(1)  # in place, like every update below: a CUDA graph replays them
    n, rows = layer.n, torch.arange(B, device=query.device)
    if layer.kc.shape[1] != kc_new.shape[1]:  # SnapKV per query head: the kept cache has Hq heads
        G = layer.kc.shape[1] // kc_new.shape[1]
        kc_new, vc_new = kc_new.repeat_interleave(G, 1), vc_new.repeat_interleave(G, 1)
    layer.kc[rows, :, n - 1] = kc_new[:, :, 0]
    layer.vc[rows, :, n - 1] = vc_new[:, :, 0]
    if layer.ks is not layer.kc:
        layer.ks[rows, :, n - 1] = ks_new[:, :, 0]
    T = layer.n_max + run.step  # the longest row, this token included
    q = query[:, :, 0]
    # static: the whole buffers, each row masked by its n (the kernels take seq_len)
    k, v = (layer.kc, layer.vc) if run.static else (layer.kc[:, :, :T], layer.vc[:, :, :T])
    m = spec.method
    if m == "dense" or (m == "quest" and i < spec.quest_dense_layers) or (m == "random" and i < spec.random_dense_layers) \
            or m == "snapkv":
        out = _dense_decode(q, k, v, n, scale)
        return out[:, None].contiguous(), None
    params = _step_params(spec, T)
    NB = -(-k.shape[2] // spec.block)  # pages / blocks covering the buffers
    if m == "dilated":
        out = ks.dilated_decode(q, k, v, params[0], spec.dilated_window, spec.dilated_prefix, seq_len=n, scale=scale)
        return out[:, None].contiguous(), None
    if m == "quest":
        _update_meta(spec, layer, n)
        idx = quest_select(q, tuple(x[:, :, :NB] for x in layer.meta), n, spec.page_size, params[0],
                           spec.quest_force_current, spec.per_query_head, spec.quest_min_pages)
    elif m == "moba":
        _update_meta(spec, layer, n)
        idx = moba_select(q, layer.meta[0][:, :, :NB], n, spec.moba_block, params[0], spec.per_query_head)
    elif m == "random":
        H = Hq if spec.per_query_head else k.shape[1]
        idx = random_select(run.generator, (B, H, NB), n, spec.random_block, params[0], spec.random_force_current)
    else:  # pragma: no cover - MethodSpec validates the name
        raise SpecError(f"unknown method {m!r}")
    out = ks.block_sparse_decode(q, k, v, idx, spec.block, seq_len=n, scale=scale)
    return out[:, None].contiguous(), None  # [B, 1, Hq, D]


# ------------------------------------------------------------------------------------ engine


class _Clock:
    """Wall seconds between laps, the device synced at each (for ``generate(stats=...)``)."""

    def __init__(self, device):
        self._time, self._device = time.perf_counter, device
        self._sync()
        self._t = self._time()

    def _sync(self):
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def lap(self) -> float:
        self._sync()
        t, self._t = self._t, self._time()
        return self._t - t


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, sparse_attention)


DECODE_MODES = ("auto", "eager", "static", "graph")


def decode_mode(decode: str, device) -> str:
    """The decoding loop ``generate`` runs: ``auto`` is ``graph`` on CUDA and ``eager`` elsewhere."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode mode {decode!r}: expected one of {', '.join(DECODE_MODES)}")
    cuda = torch.device(device).type == "cuda"
    if decode == "auto":
        return "graph" if cuda else "eager"
    if decode == "graph" and not cuda:
        raise ValueError(f"decode mode 'graph' needs a CUDA device; the model is on {device}")
    return decode


class _GraphedStep:
    """One decoding forward (``fn``: static inputs -> logits) replayed from a CUDA graph.

    Each new set of host parameters (``_step_params``) first runs the step eagerly, on the capture
    stream (it compiles kernels new to these parameters and warms up cuBLAS there), and captures it
    at the next call; the graphs of one generation share a memory pool. A memory model's cache
    replaces its recurrent state each step, so the captured step copies the new state into the old
    tensors, which are the ones the graph reads. The random selector's generator is registered with
    each graph, so every replay draws new numbers."""

    def __init__(self, fn, cache, stream, generator):
        self.fn, self.cache, self.stream, self.generator = fn, cache, stream, generator
        self.key, self.graph, self.out = None, None, None
        self.pool = torch.cuda.graph_pool_handle()

    def _fn_state_in_place(self):
        cache = self.cache
        layers = range(len(cache.layers)) if hasattr(cache, "get_memory_state") else ()
        before = [cache.get_memory_state(i) for i in layers]
        out = self.fn()
        for i, old in zip(layers, before):
            if old is not None:
                for o, new in zip(old, cache.get_memory_state(i)):
                    o.copy_(new)
                cache.set_memory_state(i, old)
        return out

    def __call__(self, key):
        cur = torch.cuda.current_stream()
        if key != self.key:
            self.key, self.graph, self.out = key, None, None
            self.stream.wait_stream(cur)
            with torch.cuda.stream(self.stream):
                out = self.fn()
            cur.wait_stream(self.stream)
            return out
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                self.out = self._fn_state_in_place()
            self.graph = graph
        self.graph.replay()
        return self.out


def _make_cache(model):
    if is_memory_model(model):
        from ratplus_megatron.hf import Olmo2MemoryCache

        return Olmo2MemoryCache(config=model.config)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


class Engine:
    """Greedy batched decoding of token prompts with one ``MethodSpec`` at a time."""

    def __init__(self, model, tokenizer=None, eos_token_ids=None):
        _register()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.memory = is_memory_model(model)
        eos = set()
        for src in (eos_token_ids, getattr(model.generation_config, "eos_token_id", None),
                    getattr(tokenizer, "eos_token_id", None)):
            if src is None:
                continue
            eos.update([src] if isinstance(src, int) else list(src))
        self.eos = sorted(eos)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self._wrapped = False
        self._capture_stream = None
        model.set_attn_implementation(ATTN_NAME)

    @classmethod
    def from_pretrained(cls, path, dtype="bf16", device="cpu", tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import ratplus_megatron.hf  # noqa: F401  registers the memory model with the Auto classes

        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
        return cls(model, tok)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def check_source(self, source: KVSource) -> None:
        if source.uses_mem and not self.memory:
            raise SpecError(f"K/V source {source.label!r} needs a memory model (K~/V~); "
                            f"{type(self.model).__name__} has plain K/V only: use --kv-source plain")

    def _wrap_memory(self):
        """Capture each memory layer's pre-scan k/v (the plain source) into the active run."""
        if self._wrapped:
            return
        for mod in self.model.modules():
            if hasattr(mod, "apply_memory") and not hasattr(mod, "_niah_orig_apply_memory"):
                orig = mod.apply_memory

                def wrapped(hidden_states, key_states, value_states, *a, _orig=orig, _mod=mod, **kw):
                    run = _ACTIVE
                    if run is not None and run.spec.source.uses_plain:
                        run.captured[_mod.layer_idx] = (key_states, value_states)
                    return _orig(hidden_states, key_states, value_states, *a, **kw)

                mod._niah_orig_apply_memory = orig
                mod.apply_memory = wrapped
        self._wrapped = True

    def _logits(self, h):
        return self.model.get_output_embeddings()(h).float()

    def decode_mode(self, decode: str = "auto") -> str:
        return decode_mode(decode, self.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: MethodSpec, max_new_tokens: int = 128,
                 return_logits: bool = False, stats: dict | None = None, decode: str = "auto") -> list[dict]:
        """Greedy continuations of token-id prompts. Returns per prompt {'tokens': [...]} (EOS
        excluded) and, with return_logits, 'logits' [steps, vocab] fp32 of the decoded steps.
        ``stats`` (a dict) receives prefill_s (the prompt's forward and first token), decode_s and
        decode_steps (the forwards after it), timed with a device sync at each boundary, each
        forward's seconds (decode_step_s: the first of a graph runs eagerly and captures) and
        decode_mode. ``decode``: see ``decode_mode`` and the module docstring."""
        global _ACTIVE
        mode = self.decode_mode(decode)
        self.check_source(spec.source)
        if spec.source.uses_plain and self.memory:
            self._wrap_memory()
        dev = self.device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        if int(lens.min()) < 1:
            raise ValueError("empty prompt")
        for n in lens.tolist():
            spec.check(n)
        T = int(lens.max())
        block = math.lcm(spec.page_size, spec.moba_block, spec.random_block)
        capacity = -(-(T + max_new_tokens) // block) * block
        ids = torch.full((B, T), self.pad_id, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, device=dev)
        mask = (torch.arange(T, device=dev)[None, :] < lens[:, None]).long()
        positions = torch.arange(T, device=dev)[None].expand(B, T)
        gen = torch.Generator(device=dev).manual_seed(spec.seed)
        cache = _make_cache(self.model)
        run = _Run(spec, self.model, cache, capacity, lens.clone(), positions, self.memory, gen,
                   static=mode != "eager")
        decoder = self.model.get_decoder()
        ids_in = torch.empty((B, 1), dtype=torch.long, device=dev)  # the decoding forward's inputs
        pos_in = torch.empty((B, 1), dtype=torch.long, device=dev)

        def decode_step():
            h = decoder(input_ids=ids_in, position_ids=pos_in, past_key_values=cache, use_cache=True).last_hidden_state
            return self._logits(h[:, -1])

        graphed = None
        if mode == "graph":
            if self._capture_stream is None:  # one per engine: cuBLAS keeps a 32 MiB workspace per stream
                self._capture_stream = torch.cuda.Stream(dev)
            graphed = _GraphedStep(decode_step, cache, self._capture_stream, gen)
        out_tokens = [[] for _ in range(B)]
        out_logits = [[] for _ in range(B)]
        done = [False] * B
        eos = torch.tensor(self.eos, device=dev, dtype=torch.long)
        _ACTIVE = run
        clock = _Clock(dev) if stats is not None else None
        try:
            h = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True).last_hidden_state
            logits = self._logits(h[torch.arange(B, device=dev), lens - 1])
            if clock:
                stats["prefill_s"] = clock.lap()
            cur = lens.clone()
            steps, step_s, t_step = 0, [], time.perf_counter()
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1)
                tokens, ended = nxt.tolist(), torch.isin(nxt, eos).tolist()  # the step's one sync
                if clock and step:
                    step_s.append(time.perf_counter() - t_step)
                    t_step += step_s[-1]
                for b in range(B):
                    if not done[b]:
                        if return_logits:
                            out_logits[b].append(logits[b].cpu())
                        if not ended[b]:
                            out_tokens[b].append(tokens[b])
                done = [d or e for d, e in zip(done, ended)]
                if all(done) or step == max_new_tokens - 1:
                    break
                ids_in.copy_(nxt[:, None])
                pos_in.copy_(cur[:, None])
                run.positions, run.rope = pos_in, None
                cur = cur + 1
                steps += 1
                run.step = steps
                if graphed is not None:
                    logits = graphed(_step_params(spec, T + steps))
                else:
                    logits = decode_step()
            if clock:
                stats.update(decode_s=clock.lap(), decode_steps=steps, decode_step_s=step_s, decode_mode=mode)
        finally:
            _ACTIVE = None
        res = []
        for b in range(B):
            r = {"tokens": out_tokens[b]}
            if return_logits:
                r["logits"] = torch.stack(out_logits[b]) if out_logits[b] else torch.empty(0)
            res.append(r)
        return res

    def generate_text(self, texts: list[str], spec: MethodSpec, max_new_tokens: int = 128) -> list[str]:
        prompts = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        outs = self.generate(prompts, spec, max_new_tokens)
        return [self.tokenizer.decode(o["tokens"], skip_special_tokens=True) for o in outs]
