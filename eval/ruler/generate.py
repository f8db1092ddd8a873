"""Seeded RULER NIAH sample generation with length fitting, and the jsonl writer / CLI.

    python -m eval.ruler.generate --tokenizer TOK --tasks all --lengths 4096,8192 \
        --samples 500 --out OUT [--split train] [--seed 42]

writes ``OUT/data/<length>/<task>.jsonl`` (test split, RULER's jsonl fields) or
``OUT/train/<length>/<task>.jsonl`` (train split: keys and values disjoint from the test split,
plus a ``target`` field holding the answers comma-joined, for SFT).

Each sample is drawn from its own RNG, seeded from (split, task, length, seed, index), so a sample
does not depend on how many others are generated. Its keys, values, needle order and depths are
drawn first; then the haystack size (essay words, noise lines or distractor-needle lines, as in
RULER) is searched so that the prompt's tokens (with the tokenizer's special tokens) plus the 128
generated tokens fit the target length, as closely as one haystack unit allows. The search is a
secant step on the token count, safeguarded by bisection, and starts from the previous sample's
size, so a sample typically costs two or three tokenizations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ratplus_megatron.files import write_atomic
from .haystacks import EssayHaystack, default_essay_haystack, word_lists
from .tasks import (
    ANSWER_PREFIX,
    DEFAULT_SEED,
    DEPTHS,
    NEEDLE,
    NOISE,
    TASKS,
    TOKENS_TO_GENERATE,
    NiahTask,
    resolve_tasks,
)

SPLITS = ("test", "train")
# One sixteenth of every key/value space (by a stable hash) is reserved for the train split.
TRAIN_BUCKETS = 16


class LengthTooSmallError(ValueError):
    """The target length cannot hold the prompt with a minimal haystack plus the answer."""


def in_train_partition(s: str) -> bool:
    """Stable hash partition of keys and values: True for the train split's share."""
    h = hashlib.blake2b(s.encode("utf-8"), digest_size=8, person=b"ruler-niah").digest()
    return int.from_bytes(h, "little") % TRAIN_BUCKETS == 0


def count_tokens(tokenizer, text: str) -> int:
    """Prompt tokens as the model will see them (special tokens such as BOS included)."""
    return len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


# ----------------------------------------------------------------------------- random draws


class _Draw:
    """Random needle keys/values of one split: words (adjective-noun), 7-digit numbers, uuid4."""

    def __init__(self, rng: random.Random, split: str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.rng = rng
        self.train = split == "train"
        self.adjs, self.nouns = word_lists()

    def _raw(self, kind: str) -> str:
        rng = self.rng
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            i = rng.randrange(len(self.adjs) * len(self.nouns))
            return f"{self.adjs[i // len(self.nouns)]}-{self.nouns[i % len(self.nouns)]}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"unknown needle type {kind!r}")

    def __call__(self, kind: str, exclude: set[str] | frozenset[str] = frozenset()) -> str:
        while True:
            s = self._raw(kind)
            if in_train_partition(s) == self.train and s not in exclude:
                return s


# ----------------------------------------------------------------------------- one sample


@dataclass
class _Sample:
    task: NiahTask
    tag: str  # seed string of this sample
    draw: _Draw
    keys: list[str]
    values: list[list[str]]
    needles: list[str]  # in the order they appear in the context
    depths: list[int]  # essay: depth percentages, one per needle, ascending
    queries: list[str]
    answers: list[str]
    distractors: list[str] = field(default_factory=list)

    def _distractor_lines(self, n: int) -> list[str]:
        planted = set(self.keys)
        while len(self.distractors) < n:
            key = self.draw(self.task.key_type, exclude=planted)
            self.distractors.append(
                NEEDLE.format(
                    type_needle_v=self.task.value_type,
                    key=key,
                    value=self.draw(self.task.value_type),
                )
            )
        return self.distractors[:n]

    def context(self, size: int, essay: EssayHaystack | None) -> tuple[str, list[float]]:
        """The context with ``size`` haystack units and the needles' depths (percent)."""
        t = self.task
        if t.haystack == "essay":
            sents = essay.sentences(size)
            cuts = [int(len(sents) * (d / 100)) for d in self.depths]
            bounds = [0] + cuts + [len(sents)]
            parts = []
            for i in range(1, len(bounds)):
                parts.append(" ".join(sents[bounds[i - 1] : bounds[i]]))
                if i - 1 < len(self.needles):
                    parts.append(self.needles[i - 1])
            return " ".join(parts), [float(d) for d in self.depths]
        if t.haystack == "noise":
            lines = [NOISE] * size
        else:  # needle: lines of distractor needles with random keys and values
            lines = list(self._distractor_lines(size))
        # distinct line indexes, uniform; a needle goes before the haystack line at its index
        pos_rng = random.Random(f"{self.tag}|positions|{size}")
        idx = sorted(pos_rng.sample(range(size), len(self.needles)))
        for i, needle in zip(reversed(idx), reversed(self.needles)):
            lines.insert(i, needle)
        return "\n".join(lines), [round(100 * i / size, 4) for i in idx]

    def prompt(self, size: int, essay: EssayHaystack | None) -> tuple[str, list[float]]:
        context, depths = self.context(size, essay)
        q = self.queries
        query = ", ".join(q[:-1]) + ", and " + q[-1] if len(q) > 1 else q[0]
        text = self.task.template().format(
            type_needle_v=self.task.type_word(), context=context, query=query
        )
        return text, depths


def _new_sample(task: NiahTask, tag: str, split: str) -> _Sample:
    rng = random.Random(tag)
    draw = _Draw(rng, split)
    keys: list[str] = []
    values: list[list[str]] = []
    needles: list[str] = []
    used: set[str] = set()
    for _ in range(task.n_keys):
        key = draw(task.key_type, exclude=used)
        used.add(key)
        keys.append(key)
        vals = []
        for _ in range(task.num_values):
            v = draw(task.value_type, exclude=used)
            used.add(v)
            vals.append(v)
            needles.append(NEEDLE.format(type_needle_v=task.value_type, key=key, value=v))
        values.append(vals)
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles))) if task.haystack == "essay" else []
    picked = rng.sample(range(task.n_keys), task.num_queries)
    queries = [keys[i] for i in picked]
    answers = [v for i in picked for v in values[i]]
    # the distractor stream has its own RNG so that it is a prefix-stable function of the tag
    dist_draw = _Draw(random.Random(f"{tag}|distractors"), split)
    return _Sample(task, tag, dist_draw, keys, values, needles, depths, queries, answers)


# ----------------------------------------------------------------------------- length fitting


def _fit(
    measure: Callable[[int], int], budget: int, guess: int, slope: float, min_size: int
) -> tuple[int, int]:
    """Largest haystack size whose token count fits ``budget`` (up to one unit's worth of
    tokens of slack). ``measure`` maps size -> tokens; ``slope`` ~ tokens per unit.
    Returns (size, tokens). Raises LengthTooSmallError if even ``min_size`` does not fit."""
    slope = max(slope, 1e-3)
    tol = max(1, math.ceil(slope))
    lo: tuple[int, int] | None = None  # largest size known to fit, with its tokens
    hi: int | None = None  # smallest size known not to fit
    x = max(min_size, guess)
    for it in range(100):
        t = measure(x)
        if t <= budget:
            if lo is None or x > lo[0]:
                lo = (x, t)
        elif hi is None or x < hi:
            hi = x
        if lo is not None and (budget - lo[1] < tol or (hi is not None and hi - lo[0] <= 1)):
            return lo
        if lo is None and x <= min_size:
            raise LengthTooSmallError(t)
        lower = lo[0] + 1 if lo is not None else min_size
        upper = hi - 1 if hi is not None else None
        nx = math.floor(x + (budget - t) / slope)  # secant step on the token count
        if it >= 6 and upper is not None:  # safeguard: plain bisection
            nx = (lower + upper) // 2
        if nx < lower or nx == x:
            nx = lower if upper is None or lo is None else (lower + upper) // 2
        if upper is not None and nx > upper:
            nx = upper if lo is None else (lower + upper + 1) // 2
        x = max(nx, min_size)
    assert lo is not None
    return lo


@dataclass
class _FitState:
    size: int | None = None
    slope: float | None = None


def _start_units(task: NiahTask) -> int:
    return 200 if task.haystack == "essay" else 8


def generate_samples(
    task: NiahTask | str,
    length: int,
    n: int,
    tokenizer,
    seed: int = DEFAULT_SEED,
    split: str = "test",
    tokens_to_generate: int = TOKENS_TO_GENERATE,
    start: int = 0,
) -> list[dict]:
    """``n`` samples (indexes ``start`` .. ``start + n - 1``) of one task at one target length."""
    return list(iter_samples(task, length, n, tokenizer, seed, split, tokens_to_generate, start))


def iter_samples(
    task: NiahTask | str,
    length: int,
    n: int,
    tokenizer,
    seed: int = DEFAULT_SEED,
    split: str = "test",
    tokens_to_generate: int = TOKENS_TO_GENERATE,
    start: int = 0,
) -> Iterator[dict]:
    """Like ``generate_samples``, one sample at a time."""
    if isinstance(task, str):
        task = resolve_tasks([task])[0]
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    check_length(length, tokens_to_generate)
    budget = length - tokens_to_generate
    essay = default_essay_haystack() if task.haystack == "essay" else None
    min_size = 1 if task.haystack == "essay" else task.n_needles
    state = _FitState()
    for index in range(start, start + n):
        tag = f"ruler-niah|{split}|{task.name}|{length}|{seed}|{index}"
        sample = _new_sample(task, tag, split)
        cache: dict[int, tuple[str, list[float], int]] = {}

        def measure(size: int) -> int:
            if size not in cache:
                text, depths = sample.prompt(size, essay)
                cache[size] = (text, depths, count_tokens(tokenizer, text))
            return cache[size][2]

        try:
            if state.size is None:
                a = max(min_size, _start_units(task))
                b = 2 * a
                ta, tb = measure(a), measure(b)
                state.slope = max((tb - ta) / (b - a), 1e-3)
                guess = max(min_size, math.floor(b + (budget - tb) / state.slope))
            else:
                guess = state.size
            size, ntok = _fit(measure, budget, guess, state.slope, min_size)
        except LengthTooSmallError as e:
            raise LengthTooSmallError(
                f"length {length} is too small for {task.name}: the prompt with a minimal "
                f"haystack takes {e.args[0]} tokens, plus {tokens_to_generate} generated"
            ) from None
        state.size = size
        text, depths, _ = cache[size]
        cut = text.rfind(ANSWER_PREFIX[:10])  # RULER splits off the answer prefix this way
        record = {
            "index": index,
            "input": text[:cut],
            "outputs": list(sample.answers),
            "length": ntok + tokens_to_generate,
            "answer_prefix": text[cut:],
            "task": task.name,
            "depths": depths,
        }
        if split == "train":
            record["target"] = " " + ", ".join(sample.answers)
        yield record


def check_length(length, tokens_to_generate: int = TOKENS_TO_GENERATE) -> int:
    if isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"bad length {length!r}: must be an integer number of tokens")
    if length <= tokens_to_generate:
        raise LengthTooSmallError(
            f"length {length} is too small: it must exceed the {tokens_to_generate} generated tokens"
        )
    return length


def check_fits(task: NiahTask | str, length: int, tokenizer, split: str = "test",
               tokens_to_generate: int = TOKENS_TO_GENERATE) -> None:
    """Raise LengthTooSmallError (naming the length) if ``length`` cannot hold ``task``'s prompt
    with the smallest haystack; cheap (one tokenization)."""
    if isinstance(task, str):
        task = resolve_tasks([task])[0]
    check_length(length, tokens_to_generate)
    essay = default_essay_haystack() if task.haystack == "essay" else None
    min_size = 1 if task.haystack == "essay" else task.n_needles
    sample = _new_sample(task, f"ruler-niah|check|{task.name}", split)
    t = count_tokens(tokenizer, sample.prompt(min_size, essay)[0])
    if t + tokens_to_generate > length:
        raise LengthTooSmallError(
            f"length {length} is too small for {task.name}: the prompt with a minimal haystack "
            f"takes {t} tokens, plus {tokens_to_generate} generated"
        )


# ----------------------------------------------------------------------------- files


def task_path(out: str | os.PathLike, length: int, task: NiahTask | str, split: str = "test") -> Path:
    name = task if isinstance(task, str) else task.name
    sub = "data" if split == "test" else "train"
    return Path(out) / sub / str(length) / f"{name}.jsonl"


def _complete(path: Path, n: int) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return False
    return len(rows) == n and [r.get("index") for r in rows] == list(range(n))


def write_jsonl_atomic(path: str | os.PathLike, rows) -> Path:
    """Write rows as jsonl to a temp file next to ``path``, then rename it into place."""
    def write(f):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return write_atomic(path, write)


def write_task_file(
    task: NiahTask | str,
    length: int,
    n: int,
    tokenizer,
    out: str | os.PathLike,
    seed: int = DEFAULT_SEED,
    split: str = "test",
    skip_existing: bool = False,
    on_sample: Callable[[], None] | None = None,
) -> Path:
    """Generate ``n`` samples and write ``OUT/data/<length>/<task>.jsonl`` (``OUT/train/...``
    for the train split) atomically. With ``skip_existing``, a complete file (n rows, indexes
    0..n-1) is kept as is."""
    if isinstance(task, str):
        task = resolve_tasks([task])[0]
    path = task_path(out, length, task, split)
    if skip_existing and _complete(path, n):
        if on_sample:
            for _ in range(n):
                on_sample()
        return path

    def rows():
        for row in iter_samples(task, length, n, tokenizer, seed, split):
            yield row
            if on_sample:
                on_sample()

    return write_jsonl_atomic(path, rows())


# ----------------------------------------------------------------------------- CLI


def parse_lengths(spec: str) -> list[int]:
    """'4096,8k,128K' -> [4096, 8192, 131072]; ValueError naming a bad value."""
    out = []
    for raw in spec.split(","):
        s = raw.strip()
        if not s:
            continue
        mult = 1
        if s[-1] in "kK":
            s, mult = s[:-1], 1024
        try:
            v = int(s) * mult
        except ValueError:
            raise ValueError(f"bad length {raw.strip()!r}: expected integers like 4096 or 8k") from None
        check_length(v)
        out.append(v)
    if not out:
        raise ValueError("no length given")
    return out


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - report any loading failure on one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load tokenizer {name!r}: {msg}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.ruler.generate",
        description="Generate RULER NIAH samples (jsonl) fitted to target lengths with a model's tokenizer.",
    )
    p.add_argument("--tokenizer", required=True, help="HF tokenizer: local dir or hub id (the evaluated model's)")
    p.add_argument("--tasks", default="all", help="'all' or a comma-separated list of: " + ", ".join(TASKS))
    p.add_argument("--lengths", default="4096", help="comma-separated target lengths in tokens (4096,8k,...)")
    p.add_argument("--samples", type=int, default=500, help="samples per task and length (RULER: 500)")
    p.add_argument("--out", required=True, help="output dir: writes OUT/data/<length>/<task>.jsonl")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="train: disjoint keys/values, comma-joined 'target' field, under OUT/train/")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--skip-existing", action="store_true", help="keep complete files already written")
    args = p.parse_args(argv)

    try:
        tasks = resolve_tasks(args.tasks)
        lengths = parse_lengths(args.lengths)
        if args.samples < 1:
            raise ValueError(f"bad --samples {args.samples}: must be at least 1")
        tokenizer = _load_tokenizer(args.tokenizer)
        for length in lengths:
            for task in tasks:
                check_fits(task, length, tokenizer, args.split)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    total = len(tasks) * len(lengths) * args.samples
    with tqdm(total=total, unit="sample", desc="ruler niah", dynamic_ncols=True) as bar:
        for length in lengths:
            for task in tasks:
                bar.set_postfix_str(f"{task.name}@{length}")
                try:
                    path = write_task_file(task, length, args.samples, tokenizer, args.out,
                                           seed=args.seed, split=args.split,
                                           skip_existing=args.skip_existing,
                                           on_sample=lambda: bar.update(1))
                except ValueError as e:
                    bar.close()
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                bar.write(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
