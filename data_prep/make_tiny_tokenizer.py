"""Rebuild the tiny byte-level BPE tokenizer shipped in data_prep/assets/tiny-bpe/.

    python data_prep/make_tiny_tokenizer.py [--output data_prep/assets/tiny-bpe] [--vocab-size 2048]

Trained with the `tokenizers` library on our own seeded synthetic corpus
(ratplus_megatron.data.synthetic_corpus), so the result is deterministic and contains no
third-party text. Special tokens: <|endoftext|> (EOS/BOS/UNK) and <|pad|> (padding), ids 0 and 1.
The folder loads with transformers.AutoTokenizer.from_pretrained(path).
"""

# Like data_prep/tokenize.py: this folder must not stay on sys.path (it holds a file named
# tokenize.py that would shadow the standard library module), so fix the path first.
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import json  # noqa: E402

EOS = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_OUTPUT = os.path.join(_HERE, "assets", "tiny-bpe")


def build(output: str, vocab_size: int = 2048, documents: int = 3000, seed: int = 1234) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ratplus_megatron.data.synthetic_corpus import iter_documents

    tok = Tokenizer(models.BPE())
    # No normalizer and no prefix space: decode(encode(text)) == text for any UTF-8 string.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_documents(documents, seed=seed), trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    os.makedirs(output, exist_ok=True)
    hf.save_pretrained(output)
    # transformers 5 records its new class name "TokenizersBackend"; the generic fast-tokenizer
    # name loads in transformers 4 and 5 alike.
    cfg_path = os.path.join(output, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    # Older and other loaders look for special_tokens_map.json; write it explicitly.
    with open(os.path.join(output, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}, f,
                  indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(output, n)) for n in os.listdir(output))
    print(f"wrote {output}: vocab {len(hf)}, eos id {hf.eos_token_id}, pad id {hf.pad_token_id}, "
          f"{size / 1024:.0f} KiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--documents", type=int, default=3000, help="synthetic training documents")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    build(a.output, a.vocab_size, a.documents, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
