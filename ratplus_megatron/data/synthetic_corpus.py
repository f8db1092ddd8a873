"""Offline, seeded corpora of pseudo-natural text for tests and the CPU quickstart.

Nothing here is third-party text: words are built from our own syllable table with a seeded
random generator, drawn with a Zipf-like frequency law, and strung into sentences and paragraphs
with capitals, commas, numbers and a few accented words, so that a byte-level tokenizer sees
something close to the statistics of prose.

    from ratplus_megatron.data.synthetic_corpus import generate_documents, write_corpus
    docs = generate_documents(100, seed=0)            # list[str], deterministic
    write_corpus("corpus.jsonl", 100, seed=0)         # also .json, .parquet, .txt

Command line:

    python -m ratplus_megatron.data.synthetic_corpus --output corpus.jsonl --documents 1000
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Iterator, List, Optional, Sequence

from ..files import write_atomic

__all__ = [
    "make_word_list",
    "iter_documents",
    "generate_documents",
    "write_corpus",
    "SUPPORTED_FORMATS",
]

SUPPORTED_FORMATS = ("jsonl", "json", "parquet", "txt")

# Our own syllable inventory (onset + nucleus + coda); combined at random into words.
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "br", "cl", "dr", "fr", "gl", "pl", "pr", "sh", "st", "th", "tr", "ch", "qu", "sp"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rk", "ck", "x"]
# Short function words keep the text looking like prose and give the tokenizer frequent merges.
_FUNCTION_WORDS = ["the", "a", "of", "and", "to", "in", "is", "that", "it", "for", "on", "with",
                   "as", "was", "by", "at", "from", "or", "an", "this", "which", "but", "not"]
# A few non-ASCII words so byte-level round trips are exercised on multi-byte UTF-8.
_ACCENTED = ["café", "naïve", "über", "señor", "façade", "déjà", "smörgås", "jalapeño"]
_END_MARKS = [".", ".", ".", ".", "?", "!", ";"]


def make_word_list(size: int = 2000, seed: int = 0) -> List[str]:
    """Return `size` distinct pseudo-words, deterministic for a given seed."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rng = random.Random(f"words-{seed}")
    words: List[str] = []
    seen = set(_FUNCTION_WORDS) | set(_ACCENTED)
    attempts = 0
    while len(words) < size:
        attempts += 1
        if attempts > 200 * size:
            raise RuntimeError(f"could not build {size} distinct words")
        n_syll = rng.choices([1, 2, 3, 4], weights=[4, 6, 3, 1])[0]
        word = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                       for _ in range(n_syll))
        if len(word) < 2 or word in seen:
            continue
        seen.add(word)
        words.append(word)
    return words


class _Sampler:
    """Draws words with Zipf-like frequencies (function words most frequent)."""

    def __init__(self, words: Sequence[str], rng: random.Random, zipf_s: float = 1.1):
        self.vocab = list(_FUNCTION_WORDS) + list(words)
        weights = [1.0 / (rank + 1) ** zipf_s for rank in range(len(self.vocab))]
        self.cum = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)
        self.rng = rng

    def word(self) -> str:
        if self.rng.random() < 0.004:
            return self.rng.choice(_ACCENTED)
        return self.rng.choices(self.vocab, cum_weights=self.cum)[0]


def _sentence(sampler: _Sampler, rng: random.Random) -> str:
    n = rng.randint(4, 18)
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.03:
            w = str(rng.randint(0, 2100))
        else:
            w = sampler.word()
        if i == 0:
            w = w[:1].upper() + w[1:]
        elif rng.random() < 0.02:
            w = w.capitalize()
        out.append(w)
        if 0 < i < n - 1 and rng.random() < 0.07:
            out[-1] += ","
    return " ".join(out) + rng.choice(_END_MARKS)


def iter_documents(num_documents: int, seed: int = 0, min_sentences: int = 1,
                   max_sentences: int = 12, vocab_size: int = 2000) -> Iterator[str]:
    """Yield `num_documents` documents; the same arguments always give the same text."""
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    if not 1 <= min_sentences <= max_sentences:
        raise ValueError("need 1 <= min_sentences <= max_sentences")
    words = make_word_list(vocab_size, seed)
    rng = random.Random(f"docs-{seed}")
    sampler = _Sampler(words, rng)
    for _ in range(num_documents):
        n = rng.randint(min_sentences, max_sentences)
        paragraphs: List[List[str]] = [[]]
        for j in range(n):
            if j > 0 and rng.random() < 0.2:
                paragraphs.append([])
            paragraphs[-1].append(_sentence(sampler, rng))
        yield "\n\n".join(" ".join(p) for p in paragraphs)


def generate_documents(num_documents: int, seed: int = 0, **kwargs) -> List[str]:
    """List version of :func:`iter_documents`."""
    return list(iter_documents(num_documents, seed=seed, **kwargs))


def _infer_format(path: str) -> str:
    lower = path.lower()
    for fmt in SUPPORTED_FORMATS:
        if lower.endswith("." + fmt):
            return fmt
    raise ValueError(f"cannot infer the corpus format from {path!r}; "
                     f"use one of the suffixes {', '.join('.' + f for f in SUPPORTED_FORMATS)}")


def write_corpus(path: str, num_documents: int, seed: int = 0, fmt: Optional[str] = None,
                 text_key: str = "text", with_ids: bool = True, **kwargs) -> List[str]:
    """Write a corpus file and return its documents.

    fmt: "jsonl" (one JSON object per line), "json" (a JSON list of objects), "parquet", or "txt"
    (one document per file is not expressible: txt writes one *line* per document, with the
    paragraph breaks replaced by spaces). Inferred from the suffix when None.
    Rows carry `text_key` and, when `with_ids`, an integer "id" column.
    """
    fmt = fmt or _infer_format(path)
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {SUPPORTED_FORMATS}")
    docs = generate_documents(num_documents, seed=seed, **kwargs)
    rows = [({"id": i, text_key: d} if with_ids else {text_key: d}) for i, d in enumerate(docs)]
    if fmt == "jsonl":
        write_atomic(path, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    elif fmt == "json":
        write_atomic(path, lambda f: json.dump(rows, f, ensure_ascii=False))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {}
        if with_ids:
            columns["id"] = pa.array(list(range(len(docs))), type=pa.int64())
        columns[text_key] = pa.array(docs, type=pa.string())
        write_atomic(path, lambda f: pq.write_table(pa.table(columns), f), binary=True)
    else:  # txt
        docs = [" ".join(d.split()) for d in docs]
        write_atomic(path, lambda f: f.writelines(d + "\n" for d in docs))
    return docs


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Write a seeded synthetic text corpus (jsonl/json/parquet/txt).")
    p.add_argument("--output", required=True, help="file to write; format from its suffix")
    p.add_argument("--documents", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-key", default="text")
    p.add_argument("--max-sentences", type=int, default=12)
    args = p.parse_args(argv)
    if args.documents < 0:
        p.error("--documents must be >= 0")
    docs = write_corpus(args.output, args.documents, seed=args.seed, text_key=args.text_key,
                        max_sentences=args.max_sentences)
    chars = sum(len(d) for d in docs)
    print(f"wrote {len(docs)} documents ({chars} characters) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
