"""Training configuration: one TOML file, every choice of the recipe in it, defaults = the HQ-SAM recipe."""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # pyright: ignore[reportMissingImports]

from finesam.devices import usable_device
from finesam.inputs import read_text_input
from finesam.text import check_name
from finesam.training.loss import IMPORTANCE_SAMPLE_RATIO, NUM_POINTS, OVERSAMPLE_RATIO


@dataclass(frozen=True)
class ModelConfig:
    weights: Path  # the frozen base: converted .safetensors or an official .pth


@dataclass(frozen=True)
class HQConfig:
    init: Path | None = None  # None: from scratch; else .hq.safetensors or an official HQ-SAM .pth
    hq_mask_only: bool = True  # the loss supervises the HQ mask alone, as in HQ-SAM's training


@dataclass(frozen=True)
class LoraConfig:
    name: str = "lora"  # names the saved file: letters, digits, _ - .
    rank: int = 16
    scale: float = 1.0
    targets: tuple[str, ...] = ("decoder",)  # names in `finesam.adapters.lora.TARGETS`, or ancestor class names
    exclude: tuple[str, ...] = ()
    init: Path | None = None  # a saved LoRA file to start from

    def __post_init__(self) -> None:
        check_name(self.name, "name")


@dataclass(frozen=True)
class VariantConfig:
    adapter: str  # "package.module:ClassName", called as ClassName(model, **options)
    options: dict[str, Any] = field(default_factory=dict)
    init: Path | None = None  # a safetensors file with the variant's state_dict


@dataclass(frozen=True)
class DataConfig:
    train: Path  # a folder with im/ and gt/ (DIS5K / ThinObject / HQSeg-44K layout)
    flip: bool = True  # random horizontal flips
    scale_jitter: tuple[float, float] | None = (0.1, 2.0)  # large-scale jitter range; None: off
    cache: bool = False  # on-disk cache of image embeddings; needs flip = false and scale_jitter off


@dataclass(frozen=True)
class PromptConfig:
    kinds: tuple[str, ...] = ("box", "points", "noise_mask")  # one drawn uniformly per sample
    max_points: int = 10  # foreground points sampled from the mask
    box_noise_scale: float = 1.0  # DN-DETR style: centre moves up to ±half the size, sides up to ±the size
    mask_prompt_value: float = 255.0  # the noisy mask is given as 0 / this value (as HQ-SAM's training does)


@dataclass(frozen=True)
class LossConfig:
    num_points: int = NUM_POINTS
    oversample_ratio: float = OVERSAMPLE_RATIO
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 12
    lr_drop_epoch: int = 10  # the learning rate is multiplied by `gamma` every `lr_drop_epoch` epochs
    gamma: float = 0.1
    batch_size: int = 4  # global: split across processes under torchrun


@dataclass(frozen=True)
class RunConfig:
    out: Path = Path("runs/finesam")
    seed: int = 0
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    log_every: int = 10  # steps
    device: str = "cpu"  # under torchrun with CUDA, each process takes cuda:LOCAL_RANK

    def __post_init__(self) -> None:
        try:
            usable_device(self.device)
        except ValueError as e:
            raise ValueError(f"device = {self.device!r} {e}") from None


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    hq: HQConfig | None = None
    lora: LoraConfig | None = None
    variant: VariantConfig | None = None
    prompts: PromptConfig = PromptConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self) -> None:
        if self.hq is None and self.lora is None and self.variant is None:
            raise ValueError("nothing to train: add an [hq], [lora] and/or [variant] section")
        if self.data.cache and (self.data.flip or self.data.scale_jitter is not None):
            raise ValueError(
                "[data] cache = true needs flip = false and scale_jitter = false (augmented images differ)"
            )
        if unknown := sorted(set(self.prompts.kinds) - {"box", "points", "noise_mask"}):
            raise ValueError(f"[prompts] kinds: unknown {unknown} (known: box, points, noise_mask)")
        if not self.prompts.kinds:
            raise ValueError("[prompts] kinds is empty")
        if self.optim.batch_size < 1 or self.optim.epochs < 1 or self.prompts.max_points < 1:
            raise ValueError("[optim] batch_size and epochs, and [prompts] max_points, must be at least 1")


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "hq": HQConfig,
    "lora": LoraConfig,
    "variant": VariantConfig,
    "prompts": PromptConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
_PATHS = {"weights", "init", "train", "out"}


# (section, key): inclusive bounds of numbers; None: unbounded
_RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("lora", "rank"): (1, 4096),
    ("lora", "scale"): (0, None),
    ("prompts", "max_points"): (1, 1024),
    ("prompts", "box_noise_scale"): (0, None),
    ("loss", "num_points"): (1, None),
    ("loss", "oversample_ratio"): (1, None),
    ("loss", "importance_sample_ratio"): (0, 1),
    ("optim", "lr"): (0, None),
    ("optim", "weight_decay"): (0, None),
    ("optim", "epochs"): (1, None),
    ("optim", "lr_drop_epoch"): (1, None),
    ("optim", "gamma"): (0, None),
    ("optim", "batch_size"): (1, None),
    ("run", "seed"): (0, None),
    ("run", "checkpoint_every"): (1, None),
    ("run", "log_every"): (1, None),
}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _checked(section: str, key: str, value: Any, kind: Any) -> Any:
    """`value` of `[section] key` as the field's type wants it, or `ValueError` naming the key."""
    where = f"[{section}] {key} = {value!r}"
    options = [k for k in get_args(kind) if k is not type(None)] if get_origin(kind) in (Union, UnionType) else [kind]
    if value is False and key == "scale_jitter":
        return None
    kind = options[0]
    if get_origin(kind) is tuple:
        element = get_args(kind)[0]
        fixed = None if get_args(kind)[-1] is Ellipsis else len(get_args(kind))
        if not isinstance(value, list) or (fixed is not None and len(value) != fixed):
            raise ValueError(f"{where}: expected a list of {fixed or 'any number of'} {_PLURALS[element]}")
        return tuple(_checked(section, key, v, element) for v in value)
    if kind is Path:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a path (a string)")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise ValueError(f"{where}: expected {_TYPE_NAMES[kind]}")
        low, high = _RANGES.get((section, key), (None, None))
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low:g}" if high is None else f"in {low:g}..{high:g}"
            raise ValueError(f"{where}: must be {bounds}")
        return kind(value)
    if kind in (bool, str) and not isinstance(value, kind):
        raise ValueError(f"{where}: expected {_TYPE_NAMES[kind]}")
    if kind is dict and not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table")
    return value


def _section(name: str, values: Any, base: Path) -> Any:
    kind = _SECTIONS[name]
    if not isinstance(values, dict):
        raise ValueError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    if unknown := sorted(set(values) - set(fields)):
        raise ValueError(f"[{name}]: unknown keys {unknown} (known: {sorted(fields)})")
    converted: dict[str, Any] = {}
    for key, value in values.items():
        value = _checked(name, key, value, fields[key].type)
        if key in _PATHS:
            value = base / value  # relative to the config file
        converted[key] = value
    try:
        return kind(**converted)
    except (TypeError, ValueError) as e:
        raise ValueError(f"[{name}]: {e}") from None


def parse_config(data: dict[str, Any], base: Path = Path()) -> TrainConfig:
    """A `TrainConfig` from parsed TOML; relative paths are taken from `base` (the config file's folder)."""
    if unknown := sorted(set(data) - set(_SECTIONS)):
        raise ValueError(f"unknown sections {unknown} (known: {sorted(_SECTIONS)})")
    for required in ("model", "data"):
        if required not in data:
            raise ValueError(f"missing [{required}] section")
    return TrainConfig(**{name: _section(name, values, base) for name, values in data.items()})


def load_config(path: str | Path) -> TrainConfig:
    """Reads a training TOML file (see `configs/`)."""
    path = Path(path)
    try:
        data = tomllib.loads(read_text_input(path, "the training config"))
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read training config {path}: {e}") from None
    try:
        return parse_config(data, path.parent)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
