"""Seeded copy documents: a list of random items, then a stretch of it written out again.

Recall in a long context rests on induction (find the earlier occurrence of what was just
written, continue as it continued), a circuit that text-like data forms late: almost every token
there is predictable without looking back. In these documents the second part can only be
predicted by copying, and it starts at a random item, so a fixed "N tokens back" rule does not
work: the model has to find its place by content. Items are the retrieval corpus's value types
(numbers, uuids, pseudo-word pairs, words), so the copying is of the same token sequences that
recall later has to copy.

    from ratplus_megatron.data.copy_corpus import copy_document
    text = copy_document(17, seed=0, words=make_word_list(3000, seed=1000))
"""
from __future__ import annotations

import random
from typing import Sequence

from .retrieval_corpus import random_value

__all__ = ["copy_document", "copy_probe_row"]

_BRIDGES = ["\nAgain: ", "\nRepeat from {first}: ", "\n\n", "\nOnce more, from {first}: ", " | ", "\nCopy: "]


def _stretches(i: int, seed: int, words: Sequence[str]) -> tuple[list[str], str, list[list[str]]]:
    """Document ``i``'s parts: the items' text, the separator, and each copied stretch's pieces
    (its bridge, then its items)."""
    rng = random.Random(f"copy|{seed}|{i}")
    style = rng.choices(["number7", "number", "uuid", "pair", "word"], weights=[3, 2, 2, 2, 1])[0]
    sep = rng.choice([", ", " ", "\n", "; "])
    items = [random_value(rng, style, words) for _ in range(rng.randint(16, 160 if style != "uuid" else 48))]
    stretches = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        first = rng.randrange(len(items))
        stop = rng.randint(first + 1, len(items))
        stretches.append([rng.choice(_BRIDGES).format(first=items[first]), *items[first:stop]])
    return items, sep, stretches


def _text(items: list[str], sep: str, stretches: list[list[str]]) -> str:
    return sep.join(items) + "".join(s[0] + sep.join(s[1:]) for s in stretches)


def copy_document(i: int, seed: int, words: Sequence[str]) -> str:
    """Document ``i``: 16-160 random items of one type, then 1-3 copied stretches of them."""
    return _text(*_stretches(i, seed, words))


def copy_probe_row(i: int, seed: int, words: Sequence[str]) -> dict | None:
    """Document ``i`` as a prompt/answer pair (RULER jsonl fields, read by ``data.sft``): cut after
    the first two items of its last stretch, so the answer (the rest of the stretch) is predictable
    only by copying; its answer-only loss falls towards 0 once the model copies. None when that
    stretch is shorter than three items."""
    items, sep, stretches = _stretches(i, seed, words)
    last = stretches[-1]
    if len(last) < 4:
        return None
    text, target = _text(items, sep, stretches), sep + sep.join(last[3:])
    return {"index": i, "input": text[:-len(target)], "target": target, "outputs": [target.strip()],
            "answer_prefix": ""}
