"""The eight RULER NIAH tasks and the strings that define the benchmark.

The prompt template, answer prefix, needle sentence and noise text below are RULER's own strings
(scripts/data/synthetic/constants.py, scripts/synthetic.yaml, scripts/data/synthetic/niah.py of
github.com/NVIDIA/RULER): they are the benchmark, so they are reproduced exactly so that scores
compare. Everything else here is our own code.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKENS_TO_GENERATE = 128
DEFAULT_SEED = 42

# RULER's 'niah' task template and answer prefix; the prompt is their concatenation ("base"
# model template: no chat wrapper), split again at the answer prefix when samples are written.
TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
    "the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"

# The needle sentence always uses the plural type name ("numbers", "uuids").
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

# The 'noise' haystack: this line, repeated, one per line.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Candidate needle depths (percent) for the essay haystack: 40 evenly spaced, rounded.
DEPTHS: tuple[int, ...] = tuple(int(round(100 * i / 39)) for i in range(40))

HAYSTACKS = ("noise", "essay", "needle")
NEEDLE_TYPES = ("words", "numbers", "uuids")


@dataclass(frozen=True)
class NiahTask:
    """One RULER NIAH configuration (the `args` of a task in RULER's synthetic.yaml)."""

    name: str
    haystack: str  # noise | essay | needle
    key_type: str  # words | numbers | uuids
    value_type: str  # words | numbers | uuids
    num_keys: int = 1  # needles with distinct keys (num_needle_k)
    num_values: int = 1  # values per key (num_needle_v)
    num_queries: int = 1  # keys asked about (num_needle_q)

    def __post_init__(self):
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"unknown haystack {self.haystack!r}")
        if self.key_type not in NEEDLE_TYPES or self.value_type not in NEEDLE_TYPES:
            raise ValueError(f"unknown needle type in {self.key_type!r}/{self.value_type!r}")

    @property
    def n_keys(self) -> int:
        """Keys actually planted: RULER raises num_needle_k to at least num_needle_q."""
        return max(self.num_keys, self.num_queries)

    @property
    def n_needles(self) -> int:
        return self.n_keys * self.num_values

    @property
    def n_answers(self) -> int:
        return self.num_queries * self.num_values

    @property
    def singular(self) -> bool:
        """RULER words the prompt in the singular when exactly one answer is expected."""
        return self.n_answers == 1

    def template(self) -> str:
        """The full prompt template (instruction, context, question, answer prefix) with the
        singular rewrite RULER applies, still holding {type_needle_v}, {context} and {query}."""
        template = TEMPLATE + ANSWER_PREFIX
        if self.singular:
            # RULER's rewrite, in RULER's order, applied to the template before formatting.
            template = template.replace("Some", "A")
            template = template.replace("are all", "is")
            template = template.replace("are", "is")
            template = template.replace("answers", "answer")
        return template

    def type_word(self) -> str:
        """The value type as it appears in instruction and question ("number" when singular)."""
        return self.value_type[:-1] if self.singular else self.value_type


TASKS: dict[str, NiahTask] = {
    t.name: t
    for t in (
        NiahTask("niah_single_1", "noise", "words", "numbers"),
        NiahTask("niah_single_2", "essay", "words", "numbers"),
        NiahTask("niah_single_3", "essay", "words", "uuids"),
        NiahTask("niah_multikey_1", "essay", "words", "numbers", num_keys=4),
        NiahTask("niah_multikey_2", "needle", "words", "numbers"),
        NiahTask("niah_multikey_3", "needle", "uuids", "uuids"),
        NiahTask("niah_multivalue", "essay", "words", "numbers", num_values=4),
        NiahTask("niah_multiquery", "essay", "words", "numbers", num_queries=4),
    )
}


def resolve_tasks(spec: str | list[str] | tuple[str, ...]) -> list[NiahTask]:
    """'all', a comma-separated string or a list of names -> tasks, in the order given.
    Raises ValueError naming any unknown task."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("no task given (use 'all' or names from: " + ", ".join(TASKS) + ")")
    if names == ["all"]:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: all, {', '.join(TASKS)}")
    seen: dict[str, NiahTask] = {}
    for n in names:
        seen.setdefault(n, TASKS[n])
    return list(seen.values())
