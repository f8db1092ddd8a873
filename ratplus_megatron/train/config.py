"""Training configuration: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

    cfg = load_config("configs/tiny_ratplus_cpu.yaml", ["train.train_iters=20", "model.memory.enabled=false"])

Every YAML section is one dataclass below; an unknown key, a value of the wrong type or a missing
file is a `TrainConfigError` whose message is one line naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..config import ConfigError, MemoryConfig, ModelConfig, PrecisionConfig, preset


class TrainConfigError(ConfigError):
    """A bad recipe or override; str() is a one-line message for the user."""


@dataclass
class ModelSection:
    """A preset plus field overrides (None = the preset's value)."""

    preset: str = "tiny"
    use_te: Optional[bool] = None  # None: Transformer Engine modules when TE is importable
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rope_theta: Optional[float] = None
    rms_norm_eps: Optional[float] = None
    init_std: Optional[float] = None

    def build(self) -> ModelConfig:
        skip = {"preset", "use_te", "memory"}
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name not in skip and getattr(self, f.name) is not None}
        return preset(self.preset, memory=dataclasses.replace(self.memory), **overrides)


@dataclass
class ParallelSection:
    tp: int = 1  # tensor parallel size (within a node)
    pp: int = 1  # pipeline parallel size (GPU only)
    sequence_parallel: bool = False  # GPU only; needs tp > 1


@dataclass
class DataSection:
    prefixes: list[str] = field(default_factory=list)  # PREFIX_text_document paths (no .bin/.idx)
    weights: Optional[list[float]] = None  # blend weights, one per prefix (None = equal)
    split: str = "98,2,0"  # train,valid,test weights of every prefix
    tokenizer: str = "data_prep/assets/tiny-bpe"  # HF tokenizer folder or hub id
    seq_length: int = 4096
    cache_dir: Optional[str] = None  # GPTDataset index cache (None: SAVE/data_cache, else next to data)
    # SFT: prefixes are PREFIX_sft data paths from `python data_prep/tokenize.py --sft` (prompt/answer
    # pairs, one per sequence, loss on answer tokens + EOS only; split as above, rows in a seeded order
    # per epoch; weights unused). Pair with checkpoint.init_from=PRETRAIN_RUN to fine-tune.
    sft: bool = False


@dataclass
class BatchSection:
    micro_batch_size: int = 1  # sequences per forward/backward on one data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    min_lr: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms and biases (1-D parameters)
    clip_grad: float = 1.0  # max global grad norm; 0 = no clipping


@dataclass
class ScheduleSection:
    style: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_iters: Optional[int] = None  # explicit warmup length, else warmup_fraction of the run
    warmup_fraction: float = 0.0
    wsd_decay_fraction: float = 0.2  # WSD: the final fraction of the run decays linearly to min_lr


@dataclass
class TrainSection:
    train_iters: Optional[int] = None  # optimizer iterations (one global batch each) ...
    train_tokens: Optional[int] = None  # ... or a token budget (iters = ceil(tokens / batch tokens))
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 0  # 0 = no validation
    eval_iters: int = 10  # validation batches (global batches) per evaluation
    exit_at_iter: Optional[int] = None  # save and stop here (like a signal): tests, manual pauses
    # SFT data (data_prep/tokenize.py --sft) whose answer-only loss is logged at each evaluation as
    # probe_loss: e.g. held-out documents cut before an answer, to see when recall appears. Never trained on.
    probe: Optional[str] = None
    # more such sets, logged as NAME_loss, e.g. {copy: held-out copy documents cut inside a copied stretch}
    probes: dict[str, str] = field(default_factory=dict)
    metrics_file: Optional[str] = None  # JSON lines of every logged step (default SAVE/metrics.jsonl)


@dataclass
class CheckpointSection:
    save: Optional[str] = None  # run directory: iter_XXXXXXX/ checkpoints, latest_checkpointed_iteration.txt
    save_interval: int = 0  # 0 = only at the end and on a signal
    init_from: Optional[str] = None  # model-only dist checkpoint (convert hf-to-mcore) for a fresh run
    resume: bool = True  # continue from SAVE's latest checkpoint when there is one
    # the distributed optimizer's format: dp_reshardable (each rank writes its buffers; resumable at
    # another DP size only) or fully_reshardable (gathered per parameter on each DP group's first
    # rank; resumable at any TP / PP / DP, slower to save). Used by GPU runs.
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"


@dataclass
class WandbSection:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "ratplus-megatron"
    name: Optional[str] = None
    entity: Optional[str] = None
    dir: Optional[str] = None  # default: SAVE (or ./wandb_runs)


@dataclass
class JointDilatedSection:
    """RAT+ joint training: each batch once with the dilated mask, once dense; one step each."""

    enabled: bool = False
    chunk: int = 64  # D: keys at chunk ends ((j + 1) % D == 0) are visible to every later query
    window: int = 0  # W: local window (i - j <= W)
    prefix: int = 0  # P: the first P tokens are always visible


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    joint_dilated: JointDilatedSection = field(default_factory=JointDilatedSection)

    # ---- derived numbers ----
    def tokens_per_iter(self) -> int:
        return self.batch.global_batch_size * self.data.seq_length

    def total_iters(self) -> int:
        if self.train.train_iters is not None:
            return self.train.train_iters
        return math.ceil(self.train.train_tokens / self.tokens_per_iter())

    def warmup_iters(self) -> int:
        if self.schedule.warmup_iters is not None:
            return self.schedule.warmup_iters
        return int(round(self.schedule.warmup_fraction * self.total_iters()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise TrainConfigError(msg)

        t, b, d = self.train, self.batch, self.data
        need((t.train_iters is None) != (t.train_tokens is None),
             "set exactly one of train.train_iters and train.train_tokens")
        need((t.train_iters or 1) > 0 and (t.train_tokens or 1) > 0, "the training length must be positive")
        need(b.micro_batch_size > 0 and b.global_batch_size > 0, "batch sizes must be positive")
        need((t.probe is None and not t.probes) or t.eval_interval > 0,
             "train.probe and train.probes are evaluated at train.eval_interval: set it > 0")
        for name in t.probes:
            need(name.isidentifier() and name not in ("probe", "val"),
                 f"train.probes: {name!r} must be an identifier other than probe and val (it is logged as NAME_loss)")
        need(d.seq_length > 0, f"data.seq_length must be positive, got {d.seq_length}")
        need(len(d.prefixes) > 0, "data.prefixes is empty: give one or more PREFIX_text_document paths")
        need(d.weights is None or len(d.weights) == len(d.prefixes),
             f"data.weights has {len(d.weights or [])} entries for {len(d.prefixes)} prefixes")
        for p in d.prefixes:
            if d.sft:
                for ext in (".tokens.npy", ".spans.npy"):
                    need(os.path.isfile(p + ext), f"SFT data prefix {p!r}: file {p + ext} not found (make it with "
                         "python data_prep/tokenize.py --sft ... --output-prefix X; the prefix is X_sft)")
                continue
            for ext in (".bin", ".idx"):
                need(os.path.isfile(p + ext), f"data prefix {p!r}: file {p + ext} not found "
                     "(make it with python data_prep/tokenize.py ... --output-prefix X; the prefix is X_text_document)")
        need(self.optimizer.lr > 0 and self.optimizer.min_lr >= 0, "optimizer.lr must be > 0 and min_lr >= 0")
        need(self.schedule.style in ("cosine", "wsd", "constant"),
             f"schedule.style must be cosine, wsd or constant, got {self.schedule.style!r}")
        need(0 <= self.schedule.warmup_fraction < 1, "schedule.warmup_fraction must be in [0, 1)")
        need(0 < self.schedule.wsd_decay_fraction <= 1, "schedule.wsd_decay_fraction must be in (0, 1]")
        need(self.warmup_iters() <= self.total_iters(), "warmup is longer than the run")
        need(t.log_interval > 0, "train.log_interval must be positive")
        need(t.eval_interval >= 0 and t.eval_iters >= 0, "train.eval_interval and eval_iters must be >= 0")
        need(self.checkpoint.save_interval >= 0, "checkpoint.save_interval must be >= 0")
        need(self.checkpoint.optimizer_sharding in ("dp_reshardable", "fully_reshardable"),
             "checkpoint.optimizer_sharding must be dp_reshardable or fully_reshardable, "
             f"got {self.checkpoint.optimizer_sharding!r}")
        need(self.checkpoint.save is not None or self.checkpoint.save_interval == 0,
             "checkpoint.save_interval needs checkpoint.save (a run directory)")
        need(self.wandb.mode in ("online", "offline", "disabled"),
             f"wandb.mode must be online, offline or disabled, got {self.wandb.mode!r}")
        jd = self.joint_dilated
        need(jd.chunk >= 1 and jd.window >= 0 and jd.prefix >= 0,
             "joint_dilated: chunk must be >= 1, window and prefix >= 0")
        need(self.parallel.tp >= 1 and self.parallel.pp >= 1, "parallel.tp and parallel.pp must be >= 1")
        need(not self.parallel.sequence_parallel or self.parallel.tp > 1, "parallel.sequence_parallel needs tp > 1")
        if self.checkpoint.init_from is not None:
            need(os.path.isdir(self.checkpoint.init_from),
                 f"checkpoint.init_from: {self.checkpoint.init_from!r} is not a directory")
        model = self.model.build()
        need(d.seq_length <= model.max_position_embeddings,
             f"data.seq_length={d.seq_length} exceeds model max_position_embeddings={model.max_position_embeddings}")
        model.validate(tp=self.parallel.tp, pp=self.parallel.pp)
        if world_size is not None:
            mp = self.parallel.tp * self.parallel.pp
            need(world_size % mp == 0, f"world size {world_size} is not a multiple of tp*pp = {mp}")
            dp = world_size // mp
            need(b.global_batch_size % (b.micro_batch_size * dp) == 0,
                 f"batch.global_batch_size={b.global_batch_size} is not a multiple of "
                 f"micro_batch_size x data-parallel size = {b.micro_batch_size} x {dp}")
        return self


# ---------------------------------------------------------------- YAML and overrides

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and mildly converted) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except TrainConfigError as e:
                errors.append(str(e))
        raise TrainConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise TrainConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TrainConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-3 and 1e10 as strings; accept them (and 10_000_000) as numbers
            value = float(value.replace("_", ""))
        except ValueError:
            pass
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TrainConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TrainConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise TrainConfigError(f"unknown config key {where}{unknown[0]!r}; valid keys{' under ' + prefix if prefix else ''}: "
                               f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainConfigError(f"override {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: Optional[str], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or None: defaults) plus ``key.sub=value`` overrides."""
    import yaml

    tree: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise TrainConfigError(f"config file {path!r} not found")
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"config file {path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise TrainConfigError(f"config file {path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_scalar(text))
    try:
        return _build(TrainConfig, tree)
    except ConfigError as e:  # e.g. an unknown preset from ModelConfig
        raise TrainConfigError(str(e)) from None
    except TypeError as e:
        raise TrainConfigError(f"bad config: {e}") from None
