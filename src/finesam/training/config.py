"""Training configuration: one TOML file, every choice of the recipe in it, defaults = the HQ-SAM recipe."""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # pyright: ignore[reportMissingImports]

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
    name: str = "lora"
    rank: int = 16
    scale: float = 1.0
    targets: tuple[str, ...] = ("decoder",)  # names in `finesam.adapters.lora.TARGETS`, or ancestor class names
    exclude: tuple[str, ...] = ()
    init: Path | None = None  # a saved LoRA file to start from


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


def _section(name: str, values: Any, base: Path) -> Any:
    kind = _SECTIONS[name]
    if not isinstance(values, dict):
        raise ValueError(f"[{name}] must be a table")
    known = {f.name for f in dataclasses.fields(kind)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"[{name}]: unknown keys {unknown} (known: {sorted(known)})")
    converted: dict[str, Any] = {}
    for key, value in values.items():
        if key in _PATHS:
            value = base / value  # relative to the config file
        elif key == "scale_jitter":
            value = None if value is False else tuple(float(v) for v in value)
        elif isinstance(value, list):
            value = tuple(value)
        converted[key] = value
    try:
        return kind(**converted)
    except TypeError as e:
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
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read training config {path}: {e}") from None
    try:
        return parse_config(data, path.parent)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
