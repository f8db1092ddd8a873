"""Checkpoint conversion between HF OLMo2 (optionally with the RAT+ memory) and megatron-core.

    python -m ratplus_megatron.convert hf-to-mcore --hf-dir HF --out-dir CKPT [--memory] ...
    python -m ratplus_megatron.convert mcore-to-hf --ckpt-dir CKPT --out-dir HF ...

hf-to-mcore writes a megatron `dist_checkpointing` checkpoint of the full model from one process.
Such a checkpoint is layout-free (each tensor is stored with its global shape; megatron reshards on
load), so the trainer loads it at any TP/PP: --tp/--pp only check that the sizes fit the model.
Next to the checkpoint: `ratplus_meta.json` (the ModelConfig, dtype, token ids) and `tokenizer/`.

mcore-to-hf reads a checkpoint saved at any TP/PP into a TP=1 PP=1 model and writes an HF directory.
It accepts (see `resolve_checkpoint_dir`):
  * a plain checkpoint directory (`metadata.json` in it; what hf-to-mcore writes);
  * a trainer directory: `latest_checkpointed_iteration.txt` names the iteration (`iter_0000500/`,
    or `release/`); without that file the highest `iter_*/` is used.
The model's tensors may sit under a key prefix in the trainer's sharded state dict (e.g. `model.`):
the prefix is read from the checkpoint metadata as the shortest key prefix in front of
`embedding.word_embeddings.weight` (optimizer states carry longer prefixes such as
`optimizer.state.exp_avg.`). The ModelConfig comes from --config if given, else `ratplus_meta.json`
in the iteration directory or the root directory, else the `config.model` section of the trainer's
`iter_*/trainer_state.json`. Token ids (bos/eos/pad) come from ratplus_meta.json, else from the tokenizer.

Memory: both directions hold the model once, in its dtype, plus one tensor at a time (safetensors are
read with plain file reads, not memory-mapped, and written by streaming each tensor after a planned
header). Measured on a 0.68B-parameter bf16 model: peak RSS = 0.7 GB (torch + megatron) + model
+ 0.4 GB (hf-to-mcore) / + 0.8 GB (mcore-to-hf: dist_checkpointing reads the largest tensors twice).
Measured at OLMo2-7B + memory gate (bench/convert_7b.py): 21.7 GB peak in both directions, 70-80 s each.

The megatron side fuses HF's q/k/v (and the memory's og_proj/g_proj) into `linear_qkv`, rows per
query group [q, (og), k, v, (g)] (ratplus_megatron.qkv_layout). Checkpoints from before the gate moved
into `linear_qkv` (a separate `linear_gate`) are refused with a message saying how to re-import them.

Errors a user can fix (missing files, wrong shapes, unknown architectures, parallel sizes that do not
divide the model) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..config import ConfigError, MemoryConfig, ModelConfig
from ..qkv_layout import (GATE, copy_common_parts, describe, guess_parts, qkv_parts_for, rows_per_group,
                          split_groups, unfused_gate_error)
from .mapping import config_from_hf, config_to_hf, hf_shapes, hf_to_mcore, mcore_to_hf

META_FILE = "ratplus_meta.json"
META_FORMAT = "ratplus-megatron-checkpoint"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
TRAINER_STATE_FILE = "trainer_state.json"  # written by ratplus_megatron.train into each iter_*/
EMBEDDING_KEY = "embedding.word_embeddings.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ConvertError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

def _progress(iterable, total: int, desc: str, quiet: bool):
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal units like transformers; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConvertError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    unit = m.group(2).upper().rstrip("B") if m.group(2) else ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ConvertError(f"--max-shard-size {text!r} must be positive")
    return size


def _prepare_out_dir(out: Path, overwrite: bool) -> Path:
    """A fresh temporary directory next to ``out`` (renamed onto ``out`` when the work is done)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConvertError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish_out_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def _copy_tokenizer(src: Path | None, dst: Path) -> list[str]:
    if src is None or not src.is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def model_config_from_dict(d: Mapping) -> ModelConfig:
    """Inverse of ``dataclasses.asdict(ModelConfig)`` (as stored in ratplus_meta.json)."""
    d = dict(d)
    mem = dict(d.pop("memory", {}) or {})
    try:
        return ModelConfig(**d, memory=MemoryConfig(**mem))
    except TypeError as e:
        raise ConfigError(f"model config in {META_FILE}: {e}") from None


def _ensure_single_process_parallel() -> None:
    """megatron's parallel state at TP=1 PP=1 (set up here unless the caller already did)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (1, 1):
            raise ConvertError(f"conversion runs at TP=1 PP=1 in one process; parallel state is TP={tp} PP={pp}")
        return
    from ..parallel import init_parallel

    try:
        init_parallel(tp=1, pp=1, backend="gloo")
    except ValueError as e:  # e.g. started under torchrun with several ranks
        raise ConvertError(f"run the converter as a single process (not under torchrun): {e}") from None


def _build_model(cfg: ModelConfig, dtype: torch.dtype):
    """The full (TP=1, PP=1) megatron model on CPU, uninitialised (torch.empty), in ``dtype``."""
    from ..config import PrecisionConfig
    from ..model import build_model, to_transformer_config

    tconfig = to_transformer_config(cfg, PrecisionConfig(bf16=dtype == torch.bfloat16),
                                    use_cpu_initialization=True, perform_initialization=False)
    return build_model(cfg, tconfig, use_te=False)


# ------------------------------------------------------------------------------------------------
# HF safetensors, read lazily
# ------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class _SafetensorsFile:
    """One .safetensors file: its header, and tensors read with plain file reads.

    Not memory-mapped on purpose: pages of a mapping count in the process's resident memory until it is
    unmapped (a 7B checkpoint would add its whole size); read() leaves them in the page cache only.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise ConvertError(f"{path}: not a safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.entries, self.base = header, 8 + n

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = SAFETENSORS_DTYPES.get(e["dtype"])
        if dtype is None:
            raise ConvertError(f"tensor {name} in {self.path} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        shape = tuple(e["shape"])
        if end - begin != torch.Size(shape).numel() * dtype.itemsize:
            raise ConvertError(f"tensor {name} in {self.path}: {end - begin} bytes for shape {list(shape)}")
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            if f.readinto(buf.numpy()) != end - begin:
                raise ConvertError(f"{self.path} is truncated (tensor {name})")
        return buf.view(dtype).reshape(shape)


class HFWeights(Mapping):
    """The tensors of an HF directory (model.safetensors, or the shards model.safetensors.index.json
    lists), read one at a time on access."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConvertError(f"{index}: not a safetensors index ({e})") from None
            self._files = {}
            for fname in sorted(set(weight_map.values())):
                if not (hf_dir / fname).is_file():
                    raise ConvertError(f"missing weight file {hf_dir / fname} (listed in {index.name})")
                self._files[fname] = _SafetensorsFile(hf_dir / fname)
            for name, fname in weight_map.items():
                if name not in self._files[fname].entries:
                    raise ConvertError(f"tensor {name} is not in {hf_dir / fname} (listed there in {index.name})")
        else:
            paths = sorted(hf_dir.glob("*.safetensors"))
            if not paths:
                extra = " (only PyTorch .bin weights found: convert them to safetensors first)" \
                    if list(hf_dir.glob("*.bin")) else ""
                raise ConvertError(f"no safetensors weights in {hf_dir}: expected model.safetensors or "
                                   f"model.safetensors.index.json{extra}")
            self._files = {p.name: _SafetensorsFile(p) for p in paths}
            weight_map = {name: fname for fname, f in self._files.items() for name in f.entries}
        self._where = weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConvertError(f"tensor {name} is missing from the HF checkpoint")
        return self._files[self._where[name]].read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)


def check_hf_tensors(weights: HFWeights, cfg: ModelConfig) -> None:
    """Every tensor ``cfg`` needs is there with its shape (from the file headers, nothing loaded)."""
    for name, shape in hf_shapes(cfg).items():
        if name not in weights:
            raise ConvertError(f"tensor {name} is missing from the HF checkpoint")
        got = weights.shape(name)
        if got != shape:
            raise ConvertError(f"tensor {name} has shape {list(got)}, expected {list(shape)} from config.json")
    extra = sorted(set(weights) - set(hf_shapes(cfg)))
    if any(".g_proj." in n or ".og_proj." in n for n in extra):
        raise ConvertError(f"the HF checkpoint holds memory gate tensors ({extra[0]}, ...) that its "
                           "config.json does not declare (memory / memory_gate_bias / memory_output_gate)")
    if extra:
        print(f"warning: ignoring {len(extra)} tensor(s) not part of OLMo2: {', '.join(extra[:5])}",
              file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# hf-to-mcore
# ------------------------------------------------------------------------------------------------

def _init_new_gates(state: dict, cfg: ModelConfig, seed: int) -> set[str]:
    """Initialise the memory gate added to a plain OLMo2 checkpoint, per cfg.memory.gate_init: the gate
    rows of every layer's fused linear_qkv (whose q/k/v rows came from HF) and the gate bias.
    Returns the names of the tensors that are wholly new (the biases)."""
    mem = cfg.memory
    gen = torch.Generator().manual_seed(seed)
    parts = qkv_parts_for(cfg)
    new = set()
    for i in range(cfg.num_layers):
        prefix = f"decoder.layers.{i}.self_attention."
        rows = split_groups(state[prefix + "linear_qkv.weight"], parts)[GATE]  # [groups, head_dim, hidden]
        if mem.gate_init == "identity":
            rows.zero_()
        else:  # drawn as HF's g_proj weight [kv heads * head_dim, hidden], placed group by group
            w = torch.empty(rows.shape[0] * rows.shape[1], rows.shape[2], dtype=torch.float32)
            rows.copy_(w.normal_(0.0, mem.gate_init_std, generator=gen).view(rows.shape))
        if mem.has_gate_bias:
            state[prefix + "memory_gate_bias"].fill_(mem.identity_bias if mem.gate_init == "identity" else 0.0)
            new.add(prefix + "memory_gate_bias")
    return new


def hf_to_mcore_command(args) -> Path:
    hf_dir, out = Path(args.hf_dir), Path(args.out_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"HF directory {hf_dir} does not exist")
    if not (hf_dir / "config.json").is_file():
        raise ConvertError(f"missing {hf_dir / 'config.json'}")
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text())
    except ValueError as e:
        raise ConvertError(f"{hf_dir / 'config.json'} is not valid JSON: {e}") from None
    if getattr(args, "gate_init_given", False) and not args.memory:
        raise ConvertError("--gate-init only applies together with --memory (adding the memory gate)")
    src = config_from_hf(hf_config)  # what the HF weights hold
    cfg = src
    if args.memory and not src.memory.enabled:
        cfg = dataclasses.replace(src, memory=MemoryConfig(enabled=True, gate_init=args.gate_init))
    elif args.memory and getattr(args, "gate_init_given", False):
        print("note: the HF checkpoint already has the memory; --gate-init is ignored", file=sys.stderr)
    cfg.validate(tp=args.tp, pp=args.pp)
    dtype = DTYPES[args.dtype]
    weights = HFWeights(hf_dir)
    check_hf_tensors(weights, src)

    tmp = _prepare_out_dir(out, args.overwrite)
    try:
        _ensure_single_process_parallel()
        model = _build_model(cfg, dtype)
        state = model.state_dict()  # detached views of the parameters: copy_ writes into the model
        wanted = {k for k in state if not k.endswith("_extra_state")}
        loaded = set()
        total = len(wanted - {k for k in wanted if k.endswith(".memory_gate_bias")}) if cfg is not src else len(wanted)
        for name, tensor in _progress(hf_to_mcore(weights, src), total, "hf-to-mcore", args.quiet):
            dst = state.get(name)
            if dst is None:  # pragma: no cover - mapping and model disagree
                raise RuntimeError(f"the megatron model has no tensor {name}")
            if cfg is not src and name.endswith("self_attention.linear_qkv.weight"):
                # the memory's gate rows join each query group: HF's q/k/v go to their rows, the gate
                # rows are initialised below
                copy_common_parts(dst, qkv_parts_for(cfg), tensor, qkv_parts_for(src))
            elif tuple(dst.shape) != tuple(tensor.shape):
                raise ConvertError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(dst.shape)}")
            else:
                dst.copy_(tensor)
            loaded.add(name)
            del tensor
        if cfg is not src:
            loaded |= _init_new_gates(state, cfg, args.seed)
        if wanted - loaded:  # pragma: no cover - the mapping covers everything else
            raise RuntimeError(f"megatron tensors received no weights: {sorted(wanted - loaded)[:3]}")
        del state

        from megatron.core import dist_checkpointing

        dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        del model
        meta = {"format": META_FORMAT, "version": 1, "model": dataclasses.asdict(cfg), "dtype": args.dtype,
                "token_ids": {k: hf_config.get(k) for k in TOKEN_ID_KEYS},
                "source": {"hf_dir": str(hf_dir.resolve()), "architectures": hf_config.get("architectures"),
                           "memory_added": cfg is not src, "seed": args.seed}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _copy_tokenizer(hf_dir, tmp / "tokenizer")
        _finish_out_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------
# mcore-to-hf
# ------------------------------------------------------------------------------------------------

def resolve_checkpoint_dir(root: Path) -> Path:
    """The directory holding the dist checkpoint: ``root`` itself, or the trainer's latest iteration."""
    if not root.is_dir():
        raise ConvertError(f"checkpoint directory {root} does not exist")
    tracker = root / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            sub = root / "release"
        elif text.isdigit():
            sub = root / f"iter_{int(text):07d}"
        else:
            raise ConvertError(f"{tracker} holds {text!r}, expected an iteration number or 'release'")
        if not (sub / "metadata.json").is_file():
            raise ConvertError(f"{tracker} names {sub.name}, but {sub} holds no dist checkpoint (metadata.json)")
        return sub
    if (root / "metadata.json").is_file():
        return root
    iters = [(int(p.name[5:]), p) for p in root.glob("iter_*")
             if p.name[5:].isdigit() and (p / "metadata.json").is_file()]
    if iters:
        return max(iters)[1]
    raise ConvertError(f"no megatron checkpoint in {root}: expected metadata.json, {TRACKER_FILE} or iter_*/")


def read_meta(root: Path, ckpt: Path, config: str | None) -> dict:
    """A megatron checkpoint's model description ({"model": ModelConfig fields, ...}): from --config
    (ours or an HF config.json), else the meta file beside the iteration or its root, else the
    trainer's state."""
    if config:
        path = Path(config)
        if not path.is_file():
            raise ConvertError(f"--config {path} does not exist")
        data = json.loads(path.read_text())
        if data.get("format") == META_FORMAT:
            return data
        cfg = config_from_hf(data)  # an HF config.json
        return {"model": dataclasses.asdict(cfg), "token_ids": {k: data.get(k) for k in TOKEN_ID_KEYS}}
    for path in (ckpt / META_FILE, root / META_FILE):
        if path.is_file():
            return json.loads(path.read_text())
    state = ckpt / TRAINER_STATE_FILE
    if state.is_file():
        model = (json.loads(state.read_text()).get("config") or {}).get("model")
        if model:
            return {"model": dataclasses.asdict(_model_config_from_trainer(model)), "token_ids": {}}
    raise ConvertError(f"no {META_FILE} in {ckpt} or {root} and no model config in {TRAINER_STATE_FILE}: pass "
                       f"--config (a {META_FILE} or the HF config.json of the model the checkpoint was made from)")


def _model_config_from_trainer(section: Mapping) -> ModelConfig:
    """The trainer's `model:` section (a preset, field overrides where not null, the memory switches)."""
    from ..config import preset

    section = dict(section)
    name = section.pop("preset", None)
    mem = section.pop("memory", None) or {}
    section.pop("use_te", None)
    overrides = {k: v for k, v in section.items() if v is not None}
    if name is None:
        return model_config_from_dict({**overrides, "memory": mem})
    return preset(name, memory=MemoryConfig(**mem), **overrides)


def detect_prefix(keys) -> str:
    """The key prefix of the model's tensors in a checkpoint ('' or e.g. 'model.')."""
    cands = [k[: -len(EMBEDDING_KEY)] for k in keys
             if k.endswith(EMBEDDING_KEY) and (len(k) == len(EMBEDDING_KEY) or k[-len(EMBEDDING_KEY) - 1] == ".")]
    if not cands:
        raise ConvertError(f"the checkpoint holds no {EMBEDDING_KEY}: not an OLMo2 megatron checkpoint")
    return min(cands, key=len)


def _check_qkv_layout(tensors, prefix: str, cfg: ModelConfig, ckpt: Path) -> None:
    """A checkpoint whose fused qkv rows are another layout (e.g. attention only, or the memory's
    [q, k, v, g] per group) than the model config's: say which, instead of a bare shape mismatch."""
    meta = tensors.get(prefix + "decoder.layers.self_attention.linear_qkv.weight")
    if meta is None:
        return
    want = qkv_parts_for(cfg)
    rows = meta.global_shape[-2]
    if rows == cfg.num_kv_heads * rows_per_group(want):
        return
    have = guess_parts(rows, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim)
    found = f"{describe(have)} per query group" if have else f"{rows} rows"
    raise ConvertError(f"checkpoint {ckpt} has linear_qkv rows {found}, the model config (memory={cfg.memory.enabled}, "
                       f"output gate={cfg.memory.output_gate}) expects {describe(want)}: the config does not match")


def load_megatron_checkpoint(root: Path, config: str | None = None):
    """(TP=1 PP=1 megatron model with the checkpoint's weights, ModelConfig, meta dict, checkpoint dir)."""
    ckpt = resolve_checkpoint_dir(root)
    meta = read_meta(root, ckpt, config)
    cfg = model_config_from_dict(meta["model"]).validate()
    _ensure_single_process_parallel()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        tensors = dist_checkpointing.load_tensors_metadata(str(ckpt))
    except (CheckpointingException, FileNotFoundError, RuntimeError) as e:
        raise ConvertError(f"cannot read the checkpoint metadata in {ckpt}: {str(e).splitlines()[0]}") from None
    prefix = detect_prefix(tensors)
    dtype = tensors[prefix + EMBEDDING_KEY].dtype
    if dtype not in DTYPE_NAMES:
        dtype = torch.float32
    model = _build_model(cfg, dtype)
    content = dist_checkpointing.load_content_metadata(str(ckpt))
    sharded = model.sharded_state_dict(prefix=prefix, metadata=content)
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from torch.distributed.checkpoint.api import CheckpointException

    wanted = {v.key for v in nested_values(sharded) if hasattr(v, "key") and "_extra_state" not in v.key}
    old_layout = unfused_gate_error(tensors, f"checkpoint {ckpt}")
    if old_layout:
        raise ConvertError(old_layout)
    _check_qkv_layout(tensors, prefix, cfg, ckpt)
    absent = sorted(k for k in wanted if k not in tensors and k + "_w" not in tensors)
    model_keys = tuple(prefix + p for p in ("embedding.", "decoder.", "output_layer."))
    surplus = sorted(k for k in tensors if k.startswith(model_keys) and "_extra_state" not in k
                     and k not in wanted and k.removesuffix("_w").removesuffix("_v") not in wanted)
    if absent or surplus:
        what = (f"lacks {', '.join(absent[:3])}" if absent else "") + (" and " if absent and surplus else "") + \
            (f"has {', '.join(surplus[:3])}" if surplus else "")
        raise ConvertError(f"checkpoint {ckpt} {what}, which the model config (memory={cfg.memory.enabled}, "
                           f"gate bias={cfg.memory.has_gate_bias}, output gate={cfg.memory.output_gate}) "
                           "does not match")

    try:
        state = dist_checkpointing.load(sharded, str(ckpt))
    except (CheckpointingException, CheckpointException) as e:
        # torch's CheckpointException carries the rank's traceback: keep megatron's own sentence
        text = str(e)
        inner = re.findall(r"CheckpointingException: (.*)", text)
        reason = inner[-1] if inner else " ".join(text.split())[:400]
        raise ConvertError(f"checkpoint {ckpt} does not match the model config: {reason}") from None
    # load() also returns the checkpoint's common (non-tensor) state, e.g. a trainer's iteration
    state = {k[len(prefix):]: v for k, v in state.items() if k in sharded}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or [k for k in unexpected if not k.endswith("_extra_state")]:
        raise ConvertError(f"checkpoint {ckpt} lacks {missing[:3]} / has unexpected {unexpected[:3]}")
    return model, cfg, meta, ckpt


def plan_shards(layout: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, max_bytes: int):
    """Split (name, shape) in write order into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for name, shape in layout:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _safetensors_header(entries, dtype: torch.dtype) -> bytes:
    code = {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def write_hf_weights(pairs, layout, out: Path, dtype: torch.dtype, max_bytes: int, quiet: bool) -> int:
    """Stream (name, tensor) pairs into safetensors shards planned from ``layout`` ((name, shape) in the
    order ``pairs`` yields them): each header is written first, then each tensor as it arrives, so one
    tensor at a time is in memory. Several shards get model.safetensors.index.json. Returns the bytes."""
    shards = plan_shards(layout, dtype, max_bytes)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    if len(shards) == 1:
        names = ["model.safetensors"]
    pairs = iter(_progress(pairs, len(layout), "mcore-to-hf", quiet))
    total = 0
    for fname, entries in zip(names, shards):
        with open(out / fname, "wb") as f:
            f.write(_safetensors_header(entries, dtype))
            for name, shape in entries:
                got, tensor = next(pairs)
                if got != name or tuple(tensor.shape) != tuple(shape):  # pragma: no cover - a mapping bug
                    raise RuntimeError(f"expected {name} {shape}, the mapping gave {got} {tuple(tensor.shape)}")
                t = tensor.to(dtype).contiguous()
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                total += t.numel() * dtype.itemsize
                del t, tensor
    if len(shards) > 1:
        weight_map = {name: fname for fname, entries in zip(names, shards) for name, _ in entries}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _token_ids_from_tokenizer(path: Path) -> dict:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a tokenizer we cannot read only costs the token ids
        print(f"warning: could not read the tokenizer for bos/eos/pad ids: {e}", file=sys.stderr)
        return {}
    return {k: getattr(tok, k, None) for k in TOKEN_ID_KEYS}


def write_hf_config(cfg: ModelConfig, token_ids: Mapping | None, dtype: torch.dtype, out: Path) -> None:
    """config.json + generation_config.json (+ the modeling files and auto_map for the memory model)."""
    from transformers import GenerationConfig, Olmo2Config

    kw = config_to_hf(cfg, token_ids)
    if cfg.memory.enabled:
        from transformers.dynamic_module_utils import custom_object_save

        from ..hf import Olmo2MemoryConfig, Olmo2MemoryForCausalLM

        config = Olmo2MemoryConfig(**kw)
        config.architectures = ["Olmo2MemoryForCausalLM"]
        config.dtype = dtype
        with torch.device("meta"):  # only for its class and module: custom_object_save copies the files
            shell = Olmo2MemoryForCausalLM(config)
        custom_object_save(shell, out, config=config)
    else:
        config = Olmo2Config(**kw)
        config.architectures = ["Olmo2ForCausalLM"]
        config.dtype = dtype
    config.save_pretrained(out)
    gen = {k: v for k, v in (token_ids or {}).items() if k in TOKEN_ID_KEYS and v is not None}
    GenerationConfig(**gen).save_pretrained(out)


def mcore_to_hf_command(args) -> Path:
    root, out = Path(args.ckpt_dir), Path(args.out_dir)
    max_bytes = parse_size(args.max_shard_size)
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise ConvertError(f"--tokenizer {args.tokenizer} is not a directory")
    model, cfg, meta, ckpt = load_megatron_checkpoint(root, args.config)
    dtype = DTYPES[args.dtype] if args.dtype else next(model.parameters()).dtype
    tmp = _prepare_out_dir(out, args.overwrite)
    try:
        state = model.state_dict()
        meta_state = {k: torch.empty(v.shape, device="meta") for k, v in state.items() if torch.is_tensor(v)}
        layout = [(name, tuple(t.shape)) for name, t in mcore_to_hf(meta_state, cfg)]
        write_hf_weights(mcore_to_hf(state, cfg), layout, tmp, dtype, max_bytes, args.quiet)
        del state, model
        sources = [Path(args.tokenizer)] if args.tokenizer else [ckpt / "tokenizer", root / "tokenizer"]
        copied = []
        for src in sources:
            copied = _copy_tokenizer(src, tmp)
            if copied:
                break
        if not copied:
            print("warning: no tokenizer files written (pass --tokenizer DIR)", file=sys.stderr)
        token_ids = meta.get("token_ids") or {}
        if copied and not any(token_ids.get(k) is not None for k in TOKEN_ID_KEYS):
            token_ids = _token_ids_from_tokenizer(tmp)
        write_hf_config(cfg, token_ids, dtype, tmp)
        _finish_out_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ratplus_megatron.convert",
                                description="Convert OLMo2 (+ RAT+ memory) between HF and megatron-core.")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("hf-to-mcore", help="HF OLMo2 directory -> megatron dist checkpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read an HF OLMo2 directory (config.json + safetensors, one tensor at a time) "
                                   "and write a megatron dist_checkpointing checkpoint plus ratplus_meta.json and "
                                   "tokenizer/.",
                       epilog="The checkpoint is written from the full model in one process. dist_checkpointing "
                              "stores every tensor\nwith its global shape and reshards on load, so the trainer "
                              "loads it at any TP/PP:\n--tp/--pp only check that those sizes divide the model "
                              "(heads, kv heads, FFN, vocab, layers).\nMemory: the model once in --dtype plus one "
                              "tensor (OLMo2-7B + gate in bf16: 21.7 GB peak, measured).")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors)")
    a.add_argument("--out-dir", required=True, help="where to write the megatron checkpoint")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size to validate against (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size to validate against (default 1)")
    a.add_argument("--memory", action="store_true",
                   help="add the RAT+ decaying memory (a gate per layer) to a plain OLMo2 checkpoint")
    a.add_argument("--gate-init", choices=("ratplus", "identity"), default=None,
                   help="initialisation of an added gate: ratplus = W_g ~ N(0, 0.02), no bias (g ~ 0.5); "
                        "identity = W_g = 0, bias -6 (g ~ 0.0025, starts close to OLMo2). Default ratplus")
    a.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="parameter dtype (default bf16)")
    a.add_argument("--seed", type=int, default=1234, help="seed of the ratplus gate initialisation")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint (any TP/PP) -> HF directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load a megatron checkpoint saved at any TP/PP into a TP=1 PP=1 model and "
                                   "write config.json, safetensors (+ index), generation_config.json and "
                                   "tokenizer files. Memory off: a stock Olmo2ForCausalLM directory. Memory on: "
                                   "Olmo2MemoryForCausalLM with its modeling files (trust_remote_code=True).",
                       epilog="--ckpt-dir is a plain checkpoint (what hf-to-mcore writes) or a trainer directory\n"
                              "(latest_checkpointed_iteration.txt, or the highest iter_*/). The model config "
                              "comes from\nratplus_meta.json (iteration dir, then --ckpt-dir) or --config.")
    b.add_argument("--ckpt-dir", required=True, help="megatron checkpoint or trainer checkpoint directory")
    b.add_argument("--out-dir", required=True, help="where to write the HF model")
    b.add_argument("--tokenizer", default=None,
                   help="directory with tokenizer files (default: the checkpoint's tokenizer/)")
    b.add_argument("--config", default=None,
                   help="ratplus_meta.json or HF config.json, when the checkpoint has no ratplus_meta.json")
    b.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the HF weights (default: the checkpoint's)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            args.gate_init_given = args.gate_init is not None
            args.gate_init = args.gate_init or "ratplus"
            out = hf_to_mcore_command(args)
        else:
            out = mcore_to_hf_command(args)
    except (ConvertError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0
