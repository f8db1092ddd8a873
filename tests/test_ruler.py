"""RULER NIAH generation and scoring (eval/ruler): CPU only, offline, fast."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from eval.ruler import generate as gen
from eval.ruler.haystacks import EssayHaystack, essay_words, sent_tokenize, word_lists
from eval.ruler.scoring import comma_set_overlap, postprocess_pred, score, string_match_all
from eval.ruler.tasks import DEPTHS, NOISE, TASKS, TOKENS_TO_GENERATE, resolve_tasks

ROOT = Path(__file__).resolve().parents[1]
TINY_BPE = ROOT / "data_prep" / "assets" / "tiny-bpe"
LENGTH = 2048
N = 3
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+?)\.(?=\s|$)")


@pytest.fixture(scope="module")
def tokenizer():
    if (TINY_BPE / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(TINY_BPE))
    # fallback: a throwaway byte-level BPE trained on the haystack texts
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(essay_words()[:20000]), NOISE * 10, "0123456789 abcdef-"]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


_cache: dict = {}


def samples(tokenizer, task, length=LENGTH, n=N, seed=42, split="test"):
    key = (task, length, n, seed, split)
    if key not in _cache:
        _cache[key] = gen.generate_samples(task, length, n, tokenizer, seed=seed, split=split)
    return _cache[key]


# ----------------------------------------------------------------------------- definitions


def test_task_table():
    want = {  # haystack, key, value, keys, values/key, queries (design doc / RULER synthetic.yaml)
        "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
        "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
        "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
        "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
        "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
        "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
        "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
        "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
    }
    got = {t.name: (t.haystack, t.key_type, t.value_type, t.n_keys, t.num_values, t.num_queries)
           for t in TASKS.values()}
    assert got == want
    assert len(DEPTHS) == 40 and len(set(DEPTHS)) == 40 and DEPTHS[0] == 0 and DEPTHS[-1] == 100
    assert [t.name for t in resolve_tasks("all")] == list(want)
    assert [t.name for t in resolve_tasks("niah_single_2, niah_multikey_1")] == [
        "niah_single_2", "niah_multikey_1"]
    with pytest.raises(ValueError, match="niah_bogus"):
        resolve_tasks("niah_single_1,niah_bogus")


def test_templates_are_rulers_strings():
    plural = TASKS["niah_multivalue"]
    assert plural.template().format(type_needle_v=plural.type_word(), context="CTX", query="Q") == (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\nCTX\nWhat are all the special magic numbers "
        "for Q mentioned in the provided text? The special magic numbers for Q mentioned in the "
        "provided text are")
    single = TASKS["niah_single_3"]
    assert single.template().format(type_needle_v=single.type_word(), context="CTX", query="Q") == (
        "A special magic uuid is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the uuid afterwards.\nCTX\nWhat is the special magic uuid "
        "for Q mentioned in the provided text? The special magic uuid for Q mentioned in the "
        "provided text is")


def test_offline_data():
    adjs, nouns = word_lists()
    assert len(adjs) > 500 and len(nouns) > 5000
    words = essay_words()
    assert len(words) > 100_000 and words[0] == "July"


def test_essay_prefix_split_is_exact():
    hay = EssayHaystack()
    for n in (1, 57, 800, 3001):
        assert hay.sentences(n) == sent_tokenize(" ".join(essay_words()[:n]).strip())
    small = EssayHaystack(essay_words()[:300])  # the haystack repeats when it runs out
    assert small.sentences(700) == sent_tokenize(" ".join((essay_words()[:300] * 3)[:700]).strip())


# ----------------------------------------------------------------------------- samples


@pytest.mark.parametrize("name", list(TASKS))
def test_sample_properties(tokenizer, name):
    task = TASKS[name]
    rows = samples(tokenizer, name)
    assert [r["index"] for r in rows] == list(range(N))
    for r in rows:
        assert set(r) >= {"index", "input", "outputs", "length", "answer_prefix"}
        assert r["task"] == name
        text = r["input"]
        # answers: count, each present in the context exactly where a needle for a queried key is
        assert len(r["outputs"]) == task.n_answers
        assert len(set(r["outputs"])) == task.n_answers
        pairs = NEEDLE_RE.findall(text)
        assert all(t == task.value_type for t, _, _ in pairs)
        kv = [(k, v) for _, k, v in pairs]
        for a in r["outputs"]:
            assert a in text
            assert sum(1 for _, v in kv if v == a) == 1
        query_part = r["answer_prefix"].split(" for ", 1)[1].rsplit(" mentioned", 1)[0]
        queries = query_part.replace(", and ", ", ").split(", ")
        assert len(queries) == task.num_queries
        assert sorted(v for k, v in kv if k in queries) == sorted(r["outputs"])
        planted = [(k, v) for k, v in kv if k in queries or (task.haystack != "needle")]
        if task.haystack != "needle":  # every needle in the text is planted
            assert len(planted) == task.n_needles
            assert len({k for k, _ in planted}) == task.n_keys
        else:  # distractor needles fill the haystack; none reuses a planted key
            assert len(kv) > 10
            assert sum(1 for k, _ in kv if k in queries) == task.n_needles
        # depths: one per needle, distinct
        assert len(r["depths"]) == task.n_needles
        assert len(set(r["depths"])) == task.n_needles
        if task.haystack == "essay":
            assert set(r["depths"]) <= set(DEPTHS)
        else:
            lines = text.split("\n")[1:-1]
            assert all(line == NOISE for line in lines if not NEEDLE_RE.fullmatch(line)) \
                or task.haystack == "needle"
        # wording
        if task.singular:
            tw = task.value_type[:-1]
            assert text.startswith(f"A special magic {tw} is hidden within the following text.")
            assert f"\nWhat is the special magic {tw} for " in text
            assert r["answer_prefix"].endswith(" mentioned in the provided text is")
        else:
            tw = task.value_type
            assert text.startswith(f"Some special magic {tw} are hidden within the following text.")
            assert f"\nWhat are all the special magic {tw} for " in text
            assert r["answer_prefix"].endswith(" mentioned in the provided text are")
        assert r["answer_prefix"].startswith(f" The special magic {tw} for ")
        assert text.endswith("mentioned in the provided text?")
        if task.num_queries > 1:
            assert re.search(r"for \S+, \S+, \S+, and \S+ mentioned", r["answer_prefix"])
        # length: fits the target, close to it, and equals the recount
        ntok = gen.count_tokens(tokenizer, text + r["answer_prefix"])
        assert r["length"] == ntok + TOKENS_TO_GENERATE
        assert r["length"] <= LENGTH
        assert r["length"] >= 0.95 * LENGTH, r["length"]


def test_fit_is_tight_for_essays(tokenizer):
    rows = samples(tokenizer, "niah_single_2")
    assert all(LENGTH - r["length"] <= 8 for r in rows), [r["length"] for r in rows]


def test_seeding(tokenizer):
    a = samples(tokenizer, "niah_multikey_1")
    b = gen.generate_samples("niah_multikey_1", LENGTH, N, tokenizer, seed=42)
    assert a == b
    c = gen.generate_samples("niah_multikey_1", LENGTH, 1, tokenizer, seed=7)
    assert c[0]["input"] != a[0]["input"]
    # a sample depends on its index only, not on how many are generated
    assert gen.generate_samples("niah_multikey_1", LENGTH, 1, tokenizer, start=2)[0] == a[2]


def test_train_split_disjoint(tokenizer):
    for name in ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "niah_multivalue"):
        test_rows = samples(tokenizer, name)
        train_rows = samples(tokenizer, name, split="train")
        strings = {}
        for split, rows in (("test", test_rows), ("train", train_rows)):
            s = set()
            for r in rows:
                for _, k, v in NEEDLE_RE.findall(r["input"]):
                    s |= {k, v}
            strings[split] = s
            assert all(gen.in_train_partition(x) == (split == "train") for x in s)
        assert strings["test"] and strings["train"]
        assert not strings["test"] & strings["train"]
        for r in train_rows:
            assert r["target"] == " " + ", ".join(r["outputs"])
            assert r["length"] <= LENGTH


def test_too_small_length_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="length 200 is too small for niah_multikey_1"):
        gen.generate_samples("niah_multikey_1", 200, 1, tokenizer)
    with pytest.raises(ValueError, match="length 100"):
        gen.generate_samples("niah_single_1", 100, 1, tokenizer)
    with pytest.raises(ValueError, match="length 200 is too small"):
        gen.check_fits("niah_multiquery", 200, tokenizer)
    with pytest.raises(ValueError, match="unknown split"):
        gen.generate_samples("niah_single_1", 1024, 1, tokenizer, split="dev")


# ----------------------------------------------------------------------------- files and CLI


def test_write_task_file(tokenizer, tmp_path):
    path = gen.write_task_file("niah_single_1", 1024, 2, tokenizer, tmp_path)
    assert path == tmp_path / "data" / "1024" / "niah_single_1.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows == gen.generate_samples("niah_single_1", 1024, 2, tokenizer)
    assert os.listdir(path.parent) == ["niah_single_1.jsonl"]  # no temp file left behind
    mtime = path.stat().st_mtime_ns
    gen.write_task_file("niah_single_1", 1024, 2, tokenizer, tmp_path, skip_existing=True)
    assert path.stat().st_mtime_ns == mtime
    tpath = gen.write_task_file("niah_single_1", 1024, 1, tokenizer, tmp_path, split="train")
    assert tpath == tmp_path / "train" / "1024" / "niah_single_1.jsonl"
    assert "target" in json.loads(tpath.read_text())


def test_cli(tmp_path, capsys, monkeypatch, tokenizer):
    monkeypatch.setattr(gen, "_load_tokenizer", lambda name: tokenizer)
    assert gen.main(["--tokenizer", "x", "--tasks", "niah_nope", "--out", str(tmp_path)]) == 2
    assert "unknown task(s) niah_nope" in capsys.readouterr().err
    assert gen.main(["--tokenizer", "x", "--lengths", "4096,abc", "--out", str(tmp_path)]) == 2
    assert "bad length 'abc'" in capsys.readouterr().err
    assert gen.main(["--tokenizer", "x", "--tasks", "niah_multivalue", "--lengths", "300",
                     "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "length 300 is too small for niah_multivalue" in err and err.count("\n") == 1
    assert gen.main(["--tokenizer", "x", "--tasks", "niah_single_1,niah_multikey_3",
                     "--lengths", "1k", "--samples", "2", "--out", str(tmp_path)]) == 0
    for name in ("niah_single_1", "niah_multikey_3"):
        lines = (tmp_path / "data" / "1024" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 2
    assert gen.parse_lengths("4096, 8k,128K") == [4096, 8192, 131072]


def test_cli_bad_tokenizer(tmp_path, capsys):
    assert gen.main(["--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load tokenizer") and err.count("\n") == 1


# ----------------------------------------------------------------------------- scoring


def test_string_match_all():
    refs = [["1234567"], ["1111111", "2222222", "3333333", "4444444"], ["abc-DEF"]]
    assert string_match_all(["The answer is 1234567.", "1111111, 2222222, 3333333, 4444444",
                             "it is ABC-def"], refs) == 100.0
    assert string_match_all(["nothing", "2222222 and 4444444", "abc"], refs) == round(
        100 * (0 + 0.5 + 0) / 3, 2)
    assert string_match_all(["", "", ""], refs) == 0.0
    assert string_match_all(["123456"], [["1234567"]]) == 0.0
    with pytest.raises(ValueError):
        string_match_all([], [])
    with pytest.raises(ValueError):
        string_match_all(["a"], [["a"], ["b"]])


def test_comma_set_overlap_and_score():
    refs = [["1111111", "2222222", "3333333", "4444444"], ["7654321"]]
    assert comma_set_overlap([" 1111111, 2222222,3333333 , 4444444", "7654321"], refs) == 100.0
    # exact pieces only: order free, case and extra words matter
    assert comma_set_overlap(["4444444, 1111111, 9999999", "is 7654321"], refs) == 25.0
    assert comma_set_overlap(["ABC"], [["abc"]]) == 0.0
    assert postprocess_pred("  12\x0034\t56 ") == "12\n34\n56"
    assert score([" 1234567\n"], [["1234567"]]) == 100.0
    assert score(["1234567, 7654321"], [["1234567", "7654321"]], "comma_set_overlap") == 100.0
    with pytest.raises(ValueError, match="unknown metric"):
        score(["a"], [["a"]], "f1")
