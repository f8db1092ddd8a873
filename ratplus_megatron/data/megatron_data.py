"""Glue between a Hugging Face tokenizer, our tokenized corpora and megatron-core's GPTDataset.

    from ratplus_megatron.data.megatron_data import MegatronTokenizerAdapter, build_gpt_datasets
    tok = MegatronTokenizerAdapter.from_pretrained("data_prep/assets/tiny-bpe")
    train, valid, test = build_gpt_datasets(["out/corpus_text_document"], tok, seq_length=128,
                                            num_samples=(1000, 50, None), split="98,2,0")

megatron-core's dataset code needs from `config.tokenizer` only: `vocab_size`, `eod` (the
document separator, our EOS), `pad` (a pad id distinct from eod; megatron masks pad tokens out of
the loss) and `unique_identifiers` (hashed into its index-cache key). The adapter supplies those,
plus tokenize/detokenize for convenience. No process group is needed and `compile_helpers()` is
never called (the megatron-core wheel ships its dataset helpers compiled).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["MegatronTokenizerAdapter", "build_gpt_datasets", "MEGATRON_NO_PAD"]

MEGATRON_NO_PAD = -1  # megatron's own "no pad token" id (never present in a dataset)


class MegatronTokenizerAdapter:
    """The tokenizer interface megatron-core's GPTDataset reads, over a HF tokenizer."""

    def __init__(self, hf_tokenizer, name_or_path: Optional[str] = None):
        self.hf = hf_tokenizer
        self.name_or_path = name_or_path or getattr(hf_tokenizer, "name_or_path", None)
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {self.name_or_path!r} has no EOS token: megatron needs one as eod")
        self._eod = int(eos)
        pad = hf_tokenizer.pad_token_id
        # a pad equal to eod would mask every document separator out of the loss
        self._pad = int(pad) if pad is not None and int(pad) != self._eod else MEGATRON_NO_PAD
        self._vocab_size = len(hf_tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "MegatronTokenizerAdapter":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name_or_path, **kwargs), name_or_path)

    # --- what megatron reads ---
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unique_identifiers(self) -> Dict[str, Any]:
        return {"class": type(self).__name__, "name_or_path": str(self.name_or_path),
                "vocab_size": self._vocab_size, "eod": self._eod, "pad": self._pad}

    # --- convenience ---
    def tokenize(self, text: str) -> List[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def build_gpt_datasets(
    prefixes: Sequence[str],
    tokenizer,
    seq_length: int,
    num_samples: Tuple[Optional[int], Optional[int], Optional[int]] = (None, None, None),
    split: str = "98,2,0",
    weights: Optional[Sequence[float]] = None,
    seed: int = 1234,
    path_to_cache: Optional[str] = None,
    **config_overrides,
):
    """Build megatron GPTDatasets (train, valid, test) from indexed-dataset prefixes.

    prefixes: paths without .bin/.idx (e.g. "out/corpus_text_document"); several make a blend
    (with `weights`, default equal). num_samples: samples per split (None = one epoch of that split;
    a blend needs explicit counts). split: megatron's "train,valid,test" weights string. Splits
    with zero weight come back as None. Extra keyword arguments go to GPTDatasetConfig.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    paths = [str(p) for p in prefixes]
    blend = (paths, list(weights) if weights is not None else None)
    cfg = dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=path_to_cache,
    )
    cfg.update(config_overrides)
    config = GPTDatasetConfig(**cfg)
    sizes = list(num_samples)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
