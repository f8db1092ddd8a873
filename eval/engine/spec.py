"""What to run: a sparse method, its budget, its K/V sources and its hyper-parameters.

Budgets
    A fraction of the context ("1/16", "0.0625", "1" = full) or a token count ("512"). A fraction
    above 1 is an error; a budget smaller than one block of the method (Quest page, MoBA block,
    random block, SnapKV window + 1) is an error at the length where it happens
    (``MethodSpec.check``). Fractions are re-evaluated against the current context at every
    decoding step (the attended share stays at the budget while tokens are generated); token
    counts are fixed. ``dense`` has no budget (label ``full``). For ``dilated`` the budget sets
    the chunk D = round(1 / fraction) (D = round(context / tokens) for a token count); window W
    and prefix P come from their own options.

K/V sources (the paper's two instantiations, ``KVSource``)
    ``mem``: the memory's K~ (post-RoPE) and V~, i.e. what a memory model caches;
    ``plain``: standard attention's K (post-RoPE) and V. For a stock model only ``plain`` exists.
    For a memory model, plain K/V are the model's own k_norm(k_proj(h)) (then RoPE) and v_proj(h)
    of the same forward pass, captured before the memory scan (the model's hidden states are those
    of the memory model: its residual stream is not recomputed without memory). Selection and
    computation each pick a source; computation's source is used by every attention the engine
    computes in that run (prefill and decoding), selection's source by the selector (Quest page
    min/max, MoBA block means, SnapKV votes; ``random`` ignores it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

METHODS = ("dense", "dilated", "quest", "moba", "snapkv", "random")
QUEST_BOUNDS = ("exact", "int8")  # Quest's page bounds: the keys' dtype, or int8 with a step per page
SOURCES = ("mem", "plain")


class SpecError(ValueError):
    """A bad method, budget or K/V source (the CLI prints it on one line and exits 2)."""


# --------------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """Either a fraction of the context (0 < fraction <= 1) or a fixed number of tokens."""

    fraction: Fraction | None = None
    tokens: int | None = None

    @property
    def full(self) -> bool:
        return self.fraction is not None and self.fraction >= 1

    def tokens_at(self, context: int) -> int:
        """Attended/kept tokens for a context of ``context`` tokens (at least 0)."""
        if self.tokens is not None:
            return self.tokens
        return int(math.floor(self.fraction * context))

    @property
    def label(self) -> str:
        """Path-safe label: 'full', '1-16', '0.1', 't512'."""
        if self.tokens is not None:
            return f"t{self.tokens}"
        if self.full:
            return "full"
        f = self.fraction
        return f"{f.numerator}-{f.denominator}" if f.numerator == 1 or f.denominator <= 1024 else str(float(f))

    @property
    def value(self) -> float | None:
        """The fraction as a float (None for a token count)."""
        return None if self.fraction is None else float(self.fraction)

    def __str__(self) -> str:
        if self.tokens is not None:
            return f"{self.tokens} tok"
        return "full" if self.full else f"{self.fraction.numerator}/{self.fraction.denominator}"


FULL = Budget(fraction=Fraction(1))


def parse_budget(text: str) -> Budget:
    """'1/16', '0.0625', '1', 'full' -> fraction; '512' (an integer > 1) -> tokens."""
    s = str(text).strip().lower()
    if s in ("full", "1", "1.0", "1/1"):
        return FULL
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            f = Fraction(int(num), int(den))
        elif "." in s or "e" in s:
            f = Fraction(s).limit_denominator(1 << 20)
        else:
            n = int(s)
            if n <= 0:
                raise SpecError(f"bad budget {text!r}: must be positive")
            return Budget(tokens=n)
    except (ValueError, ZeroDivisionError):
        raise SpecError(f"bad budget {text!r}: use a fraction like 1/16 or 0.0625, or a token count like 512") from None
    if f <= 0:
        raise SpecError(f"bad budget {text!r}: must be positive")
    if f > 1:
        raise SpecError(f"bad budget {text!r}: a budget above 1 (the whole context) is not allowed")
    return Budget(fraction=f)


def parse_budgets(spec: str) -> list[Budget]:
    out = [parse_budget(s) for s in str(spec).split(",") if s.strip()]
    if not out:
        raise SpecError("no budget given")
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class KVSource:
    selection: str = "mem"
    compute: str = "mem"

    @property
    def label(self) -> str:
        if self.selection == self.compute:
            return self.selection
        return f"sel-{self.selection}.comp-{self.compute}"

    @property
    def uses_plain(self) -> bool:
        return "plain" in (self.selection, self.compute)

    @property
    def uses_mem(self) -> bool:
        return "mem" in (self.selection, self.compute)


def parse_kv_source(text: str) -> KVSource:
    """'mem', 'plain', or 'selection=mem|plain,compute=mem|plain' (either key may be left out:
    it then defaults to the other's value)."""
    s = str(text).strip().lower()
    if s in SOURCES:
        return KVSource(s, s)
    parts = {}
    for item in s.split(","):
        if "=" not in item:
            raise SpecError(f"bad --kv-source {text!r}: use mem, plain or selection=mem|plain,compute=mem|plain")
        k, v = (x.strip() for x in item.split("=", 1))
        k = {"sel": "selection", "select": "selection", "comp": "compute"}.get(k, k)
        if k not in ("selection", "compute") or v not in SOURCES:
            raise SpecError(f"bad --kv-source {text!r}: use mem, plain or selection=mem|plain,compute=mem|plain")
        parts[k] = v
    sel = parts.get("selection", parts.get("compute"))
    comp = parts.get("compute", sel)
    return KVSource(sel, comp)


# --------------------------------------------------------------------------------------- method

# Method names that set an option of a method (eval/niah.py --methods, the benchmarks): the name's
# tag is the tag MethodSpec.label gives that option, so results keep the name.
METHOD_VARIANTS = {"quest+int8": ("quest", {"quest_bounds": "int8"})}


def parse_method_name(name: str) -> tuple[str, dict]:
    """'quest' -> ('quest', {}); 'quest+int8' -> ('quest', {'quest_bounds': 'int8'}): the method
    and the MethodSpec fields its variant sets."""
    if name in METHOD_VARIANTS:
        method, fields = METHOD_VARIANTS[name]
        return method, dict(fields)
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}; known: {', '.join(METHODS + tuple(METHOD_VARIANTS))}")
    return name, {}


@dataclass(frozen=True)
class MethodSpec:
    """One method at one budget with one K/V source, plus every method's hyper-parameters."""

    method: str = "dense"
    budget: Budget = FULL
    source: KVSource = KVSource("plain", "plain")
    # Quest
    page_size: int = 16
    quest_force_current: bool = True
    quest_dense_layers: int = 2
    # at least this many pages are kept (capped by the pages that exist); 0 = the budget alone.
    # Quest's evaluation variant: quest_force_current=False, quest_min_pages=3
    quest_min_pages: int = 0
    # page bounds in the keys' dtype ("exact") or int8 rounded outward with a step per page
    # ("int8": half the bytes the scores read; kernels/sparse page_minmax's quant)
    quest_bounds: str = "exact"
    # MoBA
    moba_block: int = 64
    # random (the selector ablation: Quest's pages and dense layers, random choice)
    random_block: int = 16
    random_force_current: bool = True
    random_dense_layers: int = 2
    # SnapKV
    snap_window: int = 32
    snap_kernel: int = 7
    snap_pool: str = "avg"
    # dilated (RAT+): window W and prefix P; the chunk D comes from the budget
    dilated_window: int = 0
    dilated_prefix: int = 0
    # selection granularity under GQA for Quest / MoBA / random / SnapKV: per KV head (group
    # queries or votes averaged, one index list per KV head) or per query head (SnapKV: K/V
    # repeated to the query heads before compression, as the original SnapKV)
    per_query_head: bool = False
    seed: int = 42

    def __post_init__(self):
        if self.method not in METHODS:
            raise SpecError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.quest_bounds not in QUEST_BOUNDS:
            raise SpecError(f"bad quest_bounds {self.quest_bounds!r}: use {' or '.join(QUEST_BOUNDS)}")
        if self.snap_pool not in ("avg", "max"):
            raise SpecError(f"bad SnapKV pooling {self.snap_pool!r}: use avg or max")
        if self.snap_kernel < 1 or self.snap_kernel % 2 == 0:
            raise SpecError(f"bad SnapKV pooling kernel {self.snap_kernel}: must be odd and positive")
        for name in ("page_size", "moba_block", "random_block", "snap_window"):
            if getattr(self, name) < 1:
                raise SpecError(f"bad {name} {getattr(self, name)}: must be positive")
        if self.quest_min_pages < 0:
            raise SpecError(f"bad quest_min_pages {self.quest_min_pages}: must be >= 0")
        if self.dilated_window < 0 or self.dilated_prefix < 0:
            raise SpecError("dilated window and prefix must be >= 0")

    # ---------------------------------------------------------------- derived quantities

    @property
    def block(self) -> int:
        """The selection unit in tokens (the smallest budget allowed)."""
        return {"quest": self.page_size, "moba": self.moba_block, "random": self.random_block,
                "snapkv": self.snap_window + 1, "dilated": 1, "dense": 1}[self.method]

    @property
    def label(self) -> str:
        """'<method>[+variant]_<budget>_<source>': the run's output folder, so variants never share one."""
        budget = "full" if self.method == "dense" else self.budget.label
        return f"{self.method}{''.join('+' + t for t in self.variant_tags)}_{budget}_{self.source.label}"

    @property
    def variant_tags(self) -> list[str]:
        """Non-default selection rules that make a different method: Quest's evaluation variant
        (no forced current page, a page minimum) and per-query-head selection under GQA."""
        tags = []
        if self.method == "quest" and not self.quest_force_current:
            tags.append("nocur")
        if self.method == "quest" and self.quest_min_pages:
            tags.append(f"min{self.quest_min_pages}")
        if self.method == "quest" and self.quest_bounds != "exact":
            tags.append(self.quest_bounds)
        if self.method in ("quest", "moba", "random", "snapkv") and self.per_query_head:
            tags.append("qhead")
        return tags

    def with_budget(self, budget: Budget) -> "MethodSpec":
        """This spec at ``budget``; dense has no budget and no selection (its source is the
        computation's)."""
        if self.method == "dense":
            return replace(self, budget=FULL, source=KVSource(self.source.compute, self.source.compute))
        return replace(self, budget=budget)

    def check(self, context: int) -> None:
        """Raise SpecError if the budget does not fit a context of ``context`` tokens."""
        if self.method == "dense":
            return
        b = self.budget
        if b.tokens is not None and b.tokens > context:
            raise SpecError(f"budget {b} for {self.method} is above 1: the context has {context} tokens")
        if b.tokens_at(context) < self.block:
            raise SpecError(f"budget {b} for {self.method} at {context} tokens is {b.tokens_at(context)} tokens, "
                            f"below one {'window + 1' if self.method == 'snapkv' else 'block'} ({self.block} tokens)")

    def blocks_at(self, context: int, block: int) -> int:
        """Blocks to select at the current context (all of them at full budget)."""
        nblocks = -(-context // block)
        if self.budget.full:
            return nblocks
        return max(1, min(nblocks, self.budget.tokens_at(context) // block))

    def dilated_chunk(self, context: int) -> int:
        b = self.budget
        if b.full:
            return 1
        if b.tokens is not None:
            return max(1, round(context / b.tokens))
        return max(1, round(1 / float(b.fraction)))

    def snap_capacity(self, context: int) -> int:
        return context if self.budget.full else self.budget.tokens_at(context)
