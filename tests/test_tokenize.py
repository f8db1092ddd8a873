"""Tests of `python data_prep/tokenize.py` (CPU, offline, shipped tiny tokenizer).

The two main conversions run the command exactly as users type it, from the repository root,
with 2 worker processes (started together, to share the slow torch/megatron import time); the
output is read back with megatron-core's IndexedDataset and GPTDataset. The cheaper checks call
the same `main()` in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a fresh clone without `pip install -e .`
    sys.path.insert(0, str(REPO))

from ratplus_megatron.data.synthetic_corpus import generate_documents, write_corpus  # noqa: E402

# megatron's IndexedDataset asks torch.distributed for a rank; there is deliberately none here
pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank:UserWarning")

TINY_TOKENIZER = REPO / "data_prep" / "assets" / "tiny-bpe"
SCRIPT = "data_prep/tokenize.py"
N_DOCS = 120


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_DATASETS_CACHE=str(tmp / "hf_datasets_cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    return env


def _cmd(*args) -> list:
    return [sys.executable, SCRIPT, *map(str, args)]


def _run(tmp: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), cwd=REPO, env=_env(tmp), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """In-process runs keep HF datasets' Arrow cache inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    jsonl_docs = write_corpus(str(d / "corpus.jsonl"), N_DOCS, seed=0)
    # an empty document (skipped) and hand-written edge cases: multi-byte UTF-8, whitespace
    extra = ["", "Tabs\tand  double  spaces, déjà vu — naïve café 日本語 🙂 end. ", "x"]
    with open(d / "corpus.jsonl", "a", encoding="utf-8") as f:
        for i, t in enumerate(extra):
            f.write(json.dumps({"id": N_DOCS + i, "text": t}, ensure_ascii=False) + "\n")
    parquet_docs = write_corpus(str(d / "corpus.parquet"), N_DOCS, seed=1)
    return {"dir": d, "jsonl": (d / "corpus.jsonl", [t for t in jsonl_docs + extra if t]),
            "parquet": (d / "corpus.parquet", parquet_docs)}


@pytest.fixture(scope="module")
def cli_runs(corpora, tmp_path_factory):
    """Both main conversions, as users type them, started concurrently; waits for both."""
    out = tmp_path_factory.mktemp("cli_out")
    procs = {}
    for fmt in ("jsonl", "parquet"):
        src, _ = corpora[fmt]
        prefix = out / fmt / "corpus"  # the folder does not exist yet: the script creates it
        procs[fmt] = (prefix, subprocess.Popen(
            _cmd("--input", src, "--tokenizer", TINY_TOKENIZER, "--output-prefix", prefix,
                 "--workers", 2, "--batch-size", 16),
            cwd=REPO, env=_env(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for fmt, (prefix, p) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        results[fmt] = (prefix, p.returncode, stdout, stderr)
    return results


def _read(prefix):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix) + "_text_document")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_cli_round_trip(fmt, cli_runs, corpora, hf_tokenizer):
    prefix, rc, stdout, stderr = cli_runs[fmt]
    assert rc == 0, stderr[-3000:]
    docs = corpora[fmt][1]
    eos = hf_tokenizer.eos_token_id
    folder = prefix.parent
    names = sorted(os.listdir(folder))
    assert names == ["corpus_text_document.bin", "corpus_text_document.idx",
                     "corpus_text_document.json"], names  # no temporaries left
    summary = json.loads((folder / "corpus_text_document.json").read_text())
    assert f"{len(docs):,} documents" in stdout
    assert summary["documents"] == len(docs)
    assert summary["dtype"] == "uint16" and summary["eos_token_id"] == eos
    assert summary["skipped_empty_documents"] == (1 if fmt == "jsonl" else 0)

    ds = _read(prefix)
    assert len(ds) == len(docs)
    assert ds.index.dtype == np.uint16
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    total = 0
    for i, doc in enumerate(docs):
        ids = ds[i]
        total += len(ids)
        assert ids[-1] == eos, f"document {i} does not end with EOS"
        assert (ids[:-1] != eos).all(), f"EOS inside document {i}"
        decoded = hf_tokenizer.decode(ids[:-1].tolist(), clean_up_tokenization_spaces=False)
        assert decoded == doc, f"document {i} does not round-trip"
    assert total == summary["tokens"] == int(ds.sequence_lengths.sum())
    assert os.path.getsize(folder / "corpus_text_document.bin") == 2 * total


def test_workers_do_not_change_the_output(cli_runs, corpora, tmp_path):
    """Ordered results: 2 worker processes write the same bytes as in-process tokenization."""
    from ratplus_megatron.data.tokenize_corpus import main

    prefix = cli_runs["jsonl"][0]
    single = tmp_path / "single"
    assert main(["--input", str(corpora["jsonl"][0]), "--tokenizer", str(TINY_TOKENIZER),
                 "--output-prefix", str(single), "--workers", "1", "--quiet"]) == 0
    for ext in (".bin", ".idx"):
        a = (Path(str(prefix) + "_text_document" + ext)).read_bytes()
        b = (Path(str(single) + "_text_document" + ext)).read_bytes()
        assert a == b, ext


def test_gpt_dataset_builds_train_and_valid(cli_runs):
    from ratplus_megatron.data.megatron_data import MegatronTokenizerAdapter, build_gpt_datasets

    prefix = cli_runs["jsonl"][0]
    tok = MegatronTokenizerAdapter.from_pretrained(str(TINY_TOKENIZER))
    assert (tok.eod, tok.pad, tok.vocab_size) == (0, 1, 2048)
    seq = 32
    train, valid, test = build_gpt_datasets([str(prefix) + "_text_document"], tok, seq_length=seq,
                                            num_samples=(64, 8, None), split="90,10,0")
    assert test is None
    assert len(train) >= 64 and len(valid) >= 8
    for ds in (train, valid):
        for k in (0, len(ds) - 1):
            s = ds[k]
            assert s["tokens"].shape == (seq,) and s["labels"].shape == (seq,)
            assert int(s["tokens"].max()) < tok.vocab_size and int(s["tokens"].min()) >= 0
            np.testing.assert_array_equal(s["tokens"][1:].numpy(), s["labels"][:-1].numpy())
    # documents are packed across EOS boundaries: some train sample holds a separator
    assert any((train[k]["tokens"] == tok.eod).any() for k in range(min(len(train), 16)))


def test_max_tokens_is_honoured(corpora, tmp_path, capsys):
    from ratplus_megatron.data.tokenize_corpus import main

    budget = 2000
    prefix = tmp_path / "budget"
    assert main(["--input", str(corpora["parquet"][0]), "--tokenizer", str(TINY_TOKENIZER),
                 "--output-prefix", str(prefix), "--workers", "1", "--batch-size", "8",
                 "--max-tokens", str(budget)]) == 0
    assert "stopped by --max-tokens" in capsys.readouterr().out
    summary = json.loads(Path(str(prefix) + "_text_document.json").read_text())
    ds = _read(prefix)
    lengths = ds.sequence_lengths
    assert summary["stopped_early"] == "max_tokens"
    assert summary["tokens"] == int(lengths.sum()) >= budget
    assert int(lengths.sum()) - int(lengths[-1]) < budget  # stopped at the first boundary past it
    assert len(ds) < N_DOCS


def test_large_vocabulary_selects_int32(tmp_path):
    from ratplus_megatron.data.tokenize_corpus import choose_dtype, main

    assert choose_dtype(65536) == "uint16" and choose_dtype(65537) == "int32"
    tok = _big_tokenizer(tmp_path / "bigtok")
    src = tmp_path / "w.jsonl"
    src.write_text("".join(json.dumps({"text": f"w{i} w{69999 - i}"}) + "\n" for i in range(5)))
    prefix = tmp_path / "big"
    assert main(["--input", str(src), "--tokenizer", str(tok), "--output-prefix", str(prefix),
                 "--workers", "1", "--quiet"]) == 0
    ds = _read(prefix)
    assert ds.index.dtype == np.int32
    assert ds[0].tolist() == [2, 70001, 0]


def _big_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer with 70002 entries: more ids than uint16 holds."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<eos>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "unk_token": "[UNK]"}))
    return folder


def _assert_one_line_error(proc_or_text, *needles):
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in text
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("case", ["missing_column", "empty_input", "missing_file", "vocab_too_big",
                                  "bad_flag"])
def test_cli_errors_are_one_line_and_leave_nothing(case, corpora, tmp_path):
    out_dir = tmp_path / "out"
    prefix = out_dir / "x"
    tokenizer = TINY_TOKENIZER
    extra = []
    if case == "missing_column":
        src = corpora["jsonl"][0]
        extra = ["--text-key", "body"]
        needles = ["'body'", "available columns: id, text", str(src)]
    elif case == "empty_input":
        src = tmp_path / "empty.jsonl"
        src.write_text("\n  \n")
        needles = ["empty", str(src)]
    elif case == "missing_file":
        src = tmp_path / "does_not_exist.parquet"
        needles = ["not found", str(src)]
    elif case == "vocab_too_big":
        src = corpora["jsonl"][0]
        tokenizer = _big_tokenizer(tmp_path / "bigtok")
        extra = ["--dtype", "uint16"]
        needles = ["--dtype uint16", "70002", "too large"]
    else:  # bad_flag
        src = corpora["jsonl"][0]
        extra = ["--workers", "0"]
        needles = ["--workers", "'0'"]
    proc = _run(tmp_path, "--input", src, "--tokenizer", tokenizer, "--output-prefix", prefix, *extra)
    assert proc.returncode == 2, proc.stderr
    _assert_one_line_error(proc, *needles)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_failure_after_writing_started_leaves_nothing(tmp_path, capsys):
    """Only empty documents: fails after the temporary .bin was opened; it must be gone."""
    from ratplus_megatron.data.tokenize_corpus import main

    src = tmp_path / "blank_texts.jsonl"
    src.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(3)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("unrelated")
    rc = main(["--input", str(src), "--tokenizer", str(TINY_TOKENIZER),
               "--output-prefix", str(out_dir / "x"), "--workers", "1", "--quiet"])
    assert rc == 2
    _assert_one_line_error(capsys.readouterr().err, "empty", str(src))
    assert sorted(os.listdir(out_dir)) == ["keep.txt"]


def test_synthetic_corpus_is_deterministic(tmp_path):
    a = generate_documents(20, seed=3)
    assert a == generate_documents(20, seed=3) and a != generate_documents(20, seed=4)
    assert all(isinstance(d, str) and d for d in a)
    docs = write_corpus(str(tmp_path / "c.parquet"), 7, seed=3)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "c.parquet").column("text").to_pylist() == docs == a[:7]


def test_non_text_column_is_a_one_line_error(corpora, tmp_path, capsys):
    from ratplus_megatron.data.tokenize_corpus import main

    rc = main(["--input", str(corpora["jsonl"][0]), "--tokenizer", str(TINY_TOKENIZER),
               "--output-prefix", str(tmp_path / "out" / "x"), "--text-key", "id", "--quiet"])
    assert rc == 2
    _assert_one_line_error(capsys.readouterr().err, "'id'", "not text", "--text-key")
    assert not (tmp_path / "out").exists()


def test_tokenizer_without_eos_is_a_one_line_error(corpora, tmp_path, capsys):
    from ratplus_megatron.data.tokenize_corpus import main

    tok = _big_tokenizer(tmp_path / "noeos")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    args = ["--input", str(corpora["jsonl"][0]), "--tokenizer", str(tok),
            "--output-prefix", str(tmp_path / "out" / "x"), "--quiet", "--max-documents", "2"]
    assert main(args) == 2
    _assert_one_line_error(capsys.readouterr().err, "no EOS", "--no-append-eos")
    assert not (tmp_path / "out").exists()
    assert main(args + ["--no-append-eos"]) == 0


def test_shipped_tiny_tokenizer_is_reproducible(tmp_path, hf_tokenizer):
    """data_prep/make_tiny_tokenizer.py rebuilds exactly the shipped data_prep/assets/tiny-bpe."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer",
                                                  REPO / "data_prep" / "make_tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build(str(tmp_path / "tiny"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tiny" / name).read_bytes() == (TINY_TOKENIZER / name).read_bytes(), name
    assert len(hf_tokenizer) == 2048
    assert hf_tokenizer.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|pad|>"]
    assert sum(f.stat().st_size for f in TINY_TOKENIZER.iterdir()) < 300 * 1024
