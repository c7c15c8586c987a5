"""Typed, frozen, closed configuration: one dataclass per YAML section.

Why closed: a misspelt key that is silently ignored costs a cluster allocation; here it is an
error naming the key, the valid keys and the nearest one. Values are checked for type, range
and combination in `__post_init__`, so a `Config` that exists is a valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from mpiml.errors import ConfigError

# The built-in models of mpiml.models (a test keeps the two lists equal).
BUILTIN_MODELS = ("mlp", "cnn", "resnet", "transformer")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}")


# Every field carries its documentation as a trailing comment (or a comment block right above
# it): `python -m mpiml.config_doc --write README.md` turns those into the README's reference,
# and a test fails when a key has none or the README is stale.


@dataclass(frozen=True)
class TrainConfig:
    """How long to train and how each rank runs."""

    seed: int = 0  # shuffling, initial weights (rank 0's are broadcast), synthetic data
    epochs: int = 10  # passes over the training split
    max_steps: int | None = None  # stop after this many optimizer steps, whatever the epoch
    accumulate_steps: int = 1  # micro-batches of data.batch_size per optimizer step and rank
    # optimizer steps between training records in metrics.jsonl (progress shows each record)
    log_every: int = 10
    eval_every_epochs: int = 1  # epochs between evaluations; the last epoch is always evaluated
    threads: int = 0  # torch threads per rank; 0 = this node's cores / ranks on this node
    # glibc: keep freed memory for the next step instead of faulting it in again (mpiml/heap.py)
    keep_freed_memory: bool = True
    # a NaN/inf loss on any rank: abort (exit 3) or skip the update, the same on every rank
    nonfinite: Literal["abort", "skip"] = "abort"

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "train.seed", self.seed, "an integer >= 0")
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps",
                 self.max_steps, "null or an integer >= 1")
        _require(self.accumulate_steps >= 1, "train.accumulate_steps", self.accumulate_steps,
                 "an integer >= 1")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "an integer >= 1")
        _require(self.eval_every_epochs >= 1, "train.eval_every_epochs", self.eval_every_epochs,
                 "an integer >= 1")
        _require(self.threads >= 0, "train.threads", self.threads, "0 (auto) or a positive integer")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and the per-rank batch size (the global batch is world_size times it)."""

    # digits: scikit-learn's 8x8 handwritten digits; synthetic: Gaussian clusters from
    # train.seed; npy: your own arrays, read a batch of rows at a time; text: the characters of
    # a UTF-8 file (language modelling); custom: your own function (see README)
    name: Literal["digits", "synthetic", "npy", "text", "custom"] = "digits"
    batch_size: int = 32  # per rank: the global batch is batch_size x ranks (x accumulate_steps)
    eval_fraction: float = 0.2  # held out when the dataset has no separate eval split
    split_seed: int = 0  # fixes the train/eval split independently of train.seed
    prefetch: int = 2  # batches one background thread loads ahead of the step; 0 = no thread
    # npy, custom: the number of classes, checked against the labels before the first step;
    # null = the largest label + 1 (npy folders: the count in mpiml-dataset.json)
    num_classes: int | None = None
    samples: int = 4096  # synthetic: number of samples
    features: int = 32  # synthetic: input features
    classes: int = 4  # synthetic: classes (one Gaussian cluster each)
    noise: float = 1.0  # synthetic: standard deviation around each centre; more overlaps more
    # npy: a folder written by `python -m mpiml.data convert` (its header is checked on
    # open); or leave it null and give x_path and y_path
    path: str | None = None
    x_path: str | None = None  # npy: inputs, shape (samples, ...), any numeric dtype
    y_path: str | None = None  # npy: integer labels 0..C-1, shape (samples,)
    eval_x_path: str | None = None  # npy: inputs of a separate eval split (else the last rows)
    eval_y_path: str | None = None  # npy: labels of that eval split
    # text: a UTF-8 file, or stdlib:MODULE for the source file of a module that ships with
    # Python (the default is pydoc's help text, about 750 kB: nothing to download)
    text_path: str = "stdlib:pydoc_data.topics"
    block_size: int = 64  # text: characters per sample (the model's context length)
    stride: int | None = None  # text: characters between sample starts; null = block_size
    function: str | None = None  # custom: 'package.module:function' that returns your data
    kwargs: dict[str, Any] = field(default_factory=dict)  # custom: keyword arguments for it

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction,
                 "a number in [0, 1)")
        _require(self.split_seed >= 0, "data.split_seed", self.split_seed, "an integer >= 0")
        _require(self.prefetch >= 0, "data.prefetch", self.prefetch, "an integer >= 0")
        _require(self.num_classes is None or self.num_classes >= 1, "data.num_classes",
                 self.num_classes, "null or an integer >= 1")
        _require(self.samples >= 1, "data.samples", self.samples, "an integer >= 1")
        _require(self.features >= 1, "data.features", self.features, "an integer >= 1")
        _require(self.classes >= 2, "data.classes", self.classes, "an integer >= 2")
        _require(self.noise >= 0, "data.noise", self.noise, "a number >= 0")
        _require(self.block_size >= 1, "data.block_size", self.block_size, "an integer >= 1")
        _require(self.stride is None or self.stride >= 1, "data.stride", self.stride,
                 "null or an integer >= 1")
        if self.name == "npy":
            pair = self.x_path is not None or self.y_path is not None
            _require(self.path is None or not pair, "data.path", self.path,
                     "null when data.x_path/data.y_path are given (a folder or a pair, not both)")
            if self.path is None:
                for key in ("x_path", "y_path"):
                    _require(getattr(self, key) is not None, f"data.{key}", None,
                             "a path to a .npy file when data.name is 'npy' (or set data.path "
                             "to a folder written by `python -m mpiml.data convert`)")
            _require((self.eval_x_path is None) == (self.eval_y_path is None),
                     "data.eval_x_path", self.eval_x_path,
                     "to be given together with data.eval_y_path, or both left out")
        else:  # a path that would be silently ignored: the user thinks it trains on their data
            for key in ("path", "x_path", "y_path", "eval_x_path", "eval_y_path"):
                _require(getattr(self, key) is None, f"data.{key}", getattr(self, key),
                         f"null unless data.name is 'npy' (data.name is {self.name!r})")
        if self.name == "custom":
            _require(self.function is not None and ":" in self.function
                     and all(self.function.split(":")), "data.function", self.function,
                     "'package.module:function' when data.name is 'custom'")
        else:
            _require(self.function is None and not self.kwargs, "data.function",
                     self.function, f"null, and data.kwargs empty, unless data.name is 'custom' "
                     f"(data.name is {self.name!r})")


@dataclass(frozen=True)
class ModelConfig:
    """A built-in model or any 'package.module:Class' built with `kwargs`."""

    # 'mlp', 'cnn', 'resnet' (images), 'transformer' (data.name text), or
    # 'package.module:Class' for your own nn.Module
    name: str = "mlp"
    # keyword arguments for the model (mlp: hidden; cnn: channels, hidden; resnet: widths,
    # blocks; transformer: dim, depth, heads, dropout)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        builtin = self.name in BUILTIN_MODELS
        _require(builtin or (":" in self.name and all(self.name.split(":"))), "model.name",
                 self.name, ", ".join(repr(m) for m in BUILTIN_MODELS)
                 + " or 'package.module:Class'")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"  # adamw decays weights apart from the gradient
    lr: float = 0.1  # peak learning rate, before lr_scaling
    # multiply lr by the number of ranks (linear, Goyal et al.) or its square root (sqrt)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    # after warmup: constant; cosine falls along half a cosine to 0 when training ends (the
    # last step still has a small lr); step multiplies by step_gamma every step_every steps
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0  # step k < warmup_steps uses lr x (k+1)/warmup_steps
    step_every: int = 1000  # step schedule: lr x step_gamma^(step // step_every), from step 0
    step_gamma: float = 0.1  # step schedule: the factor applied every step_every steps
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only, needs momentum > 0
    # L2 penalty added to the gradient (sgd, adam) or decoupled decay lr x wd x w (adamw)
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None  # clip the averaged gradients to this global L2 norm
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw: moment decay rates
    eps: float = 1e-8  # adam, adamw: added to the denominator

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        _require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "a number in [0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
                 "two numbers in [0, 1)")
        _require(self.eps > 0, "optim.eps", self.eps, "a number > 0")
        _require(self.clip_grad_norm is None or self.clip_grad_norm > 0, "optim.clip_grad_norm",
                 self.clip_grad_norm, "null or a number > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps,
                 "an integer >= 0")
        _require(self.step_every >= 1, "optim.step_every", self.step_every, "an integer >= 1")
        _require(0 < self.step_gamma <= 1, "optim.step_gamma", self.step_gamma,
                 "a number in (0, 1]")
        _require(not self.nesterov or (self.name == "sgd" and self.momentum > 0),
                 "optim.nesterov", self.nesterov, "false unless sgd with momentum > 0")


@dataclass(frozen=True)
class CommConfig:
    """How gradients are synchronised."""

    # auto: buckets in node-shared memory, summed there by the node's ranks and across nodes
    # by our ring (buckets under 128 KiB by MPI's Allreduce); ring: our pipelined ring over
    # all ranks; mpi: MPI's own Allreduce, to compare and as a fallback
    algorithm: Literal["auto", "ring", "mpi"] = "auto"
    # 16-bit wire, summed in float32 (under algorithm auto, between nodes only: within a
    # node the buckets are read from shared memory and nothing travels)
    compression: Literal["none", "fp16", "bf16"] = "none"
    bucket_mb: float = 4.0  # gradients are fused into buckets of about this many MiB
    # start each bucket's allreduce during backward; auto: time the first steps both ways
    # and keep the faster (overlap needs a core or a network to run on beside backward)
    overlap: bool | Literal["auto"] = "auto"
    # under algorithm auto: the parameters in node-shared memory, and each of the node's
    # ranks runs the optimizer on its 1/L of them (less work and state per rank;
    # checkpoints keep the usual layout); false: every rank steps every parameter
    shard_optimizer: bool = True
    # abort the job (exit 4) when a collective waits this long for a rank; null: never
    timeout_s: float | None = 300.0

    def __post_init__(self) -> None:
        _require(self.bucket_mb > 0, "comm.bucket_mb", self.bucket_mb, "a number > 0")
        _require(self.timeout_s is None or self.timeout_s > 0, "comm.timeout_s", self.timeout_s,
                 "null or a number of seconds > 0")
        _require(self.compression == "none" or self.algorithm != "mpi", "comm.compression",
                 self.compression, "'none' when comm.algorithm is 'mpi' (MPI cannot add 16-bit "
                 "values in float32)")


@dataclass(frozen=True)
class CheckpointConfig:
    """When rank 0 saves `run.dir/checkpoints/step-<N>/`; one is always saved at the end."""

    every_steps: int | None = None  # also save every this many steps; null: only at the end
    keep: int | None = None  # keep only the newest `keep` checkpoints; null keeps all

    def __post_init__(self) -> None:
        _require(self.every_steps is None or self.every_steps >= 1, "checkpoint.every_steps",
                 self.every_steps, "null or an integer >= 1")
        _require(self.keep is None or self.keep >= 1, "checkpoint.keep", self.keep,
                 "null or an integer >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Where rank 0 writes config.yaml, metrics.jsonl and checkpoints/."""

    dir: str = "runs/default"  # created if missing; a rerun appends to its metrics.jsonl

    def __post_init__(self) -> None:
        _require(bool(self.dir), "run.dir", self.dir, "a non-empty path")


@dataclass(frozen=True)
class LogConfig:
    """What rank 0 shows while the job runs, and where else it records the training records."""

    # auto: a bar when the launcher's output is a terminal, plain lines (one per training
    # record, with ETA) when it goes to a file such as a SLURM log; bar or lines force one; off
    # shows neither (start, evaluation and checkpoint messages still print)
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    # lines: at most one line per this many seconds, plus the first record of each epoch and
    # the last of the run (a log stays readable at any log_every); 0: a line per record
    lines_every_s: float = 10.0
    # also write TensorBoard event files to run.dir/tensorboard (pip install 'mpiml[tensorboard]')
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _require(self.lines_every_s >= 0, "log.lines_every_s", self.lines_every_s,
                 "a number >= 0")


@dataclass(frozen=True)
class Config:
    """The whole job: one section per YAML mapping."""

    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) that YAML and JSON can hold."""
        return _plain(dataclasses.asdict(self))


def scaled_lr(cfg: OptimConfig, world_size: int) -> float:
    """`optim.lr` scaled for the world size as `optim.lr_scaling` asks (the global batch grows
    with the number of ranks, so the same lr would take relatively smaller steps)."""
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}
    return cfg.lr * factor[cfg.lr_scaling]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- building from plain data -------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it in the field's own type."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key} = {value!r} is not one of the choices: "
                          + ", ".join(repr(a) for a in args))
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(f"{key}[{i}]", v, a)
                         for i, (v, a) in enumerate(zip(value, args, strict=True)))
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected a list of "
                          f"{len(args)} values")
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected a mapping")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML reads .inf and .nan: never a sane setting
                raise ConfigError(f"{key} = {value!r} is invalid: expected a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}")


def sections() -> dict[str, type]:
    """YAML section name -> its dataclass, in the order of `Config`."""
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _unknown_key(key: str, name: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    if not near and "." in key:  # a real key put in the wrong section: name where it lives
        homes = [f"{section}.{name}" for section, cls in sections().items()
                 if name in {f.name for f in dataclasses.fields(cls)}]
        hint = f" Did you mean '{homes[0]}'?" if homes else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in valid:
            raise _unknown_key(key, str(name), valid)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - fields all have defaults
        raise ConfigError(f"{where}: {err}") from err


def config_from_dict(data: Any) -> Config:
    """Validate plain data (as parsed from YAML) into a `Config`."""
    return _build(Config, data, "")


def add_override_option(parser: Any) -> None:
    """`--set SECTION.KEY=VALUE` (repeatable) on an argparse parser, read by `load_config`."""
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config value (parsed as YAML); repeatable")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` (value parsed as YAML) to plain config data."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. optim.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({err})") from err
    keys = path.strip().split(".")
    node = data
    for part in keys[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or the defaults when `path` is None) and apply `--set` overrides."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, "
                              f"got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)


def dump_config(config: Config) -> str:
    """The resolved config as YAML, every key present: what was actually run."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
