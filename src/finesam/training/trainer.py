"""The training loop: adapters on a frozen base, checkpoints and exact resume, metrics, torchrun scale-out."""

import csv
import dataclasses
import gc
import io
import json
import math
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from finesam.data.pairs import check_masks, list_pairs
from finesam.data.sampling import sample_generator
from finesam.model.prompts import Prompts
from finesam.model.sam import SegmentAnything
from finesam.process import seeded_global_rng
from finesam.training.adapters import build_adapters
from finesam.training.cache import EmbeddingCache
from finesam.training.config import PromptConfig, TrainConfig
from finesam.training.data import Sample, TrainingSet
from finesam.training.distributed import Distributed
from finesam.training.loss import point_sampled_loss
from finesam.training.plot import plot_loss
from finesam.weights import load_sam, save_adapter
from finesam.weights.integrity import checkpoint_problem
from finesam.weights.io import atomic_write
from finesam.weights.loading import weights_digest

CHECKPOINT = "checkpoint.pt"
RESUME_KEYS = {"adapters", "optimizer", "scheduler", "step", "metrics"}


class AdapterLoss(nn.Module):
    """The trainable part seen by the optimiser and DistributedDataParallel: the adapters' parameters only.

    The frozen base is held outside the module tree, so DDP neither broadcasts nor synchronises it.
    """

    def __init__(self, model: SegmentAnything, adapters: dict[str, Any], config: TrainConfig) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        self._model = [model]
        self.config = config

    def forward(
        self, embeddings: Tensor, features: list[dict[str, Tensor]], samples: list[Sample], generators: list[Any]
    ) -> tuple[Tensor, Tensor, Tensor]:
        model, loss_config = self._model[0], self.config.loss
        totals = []
        for i, sample in enumerate(samples):
            prompt = sample.prompt
            mask_input = None if prompt.mask_input is None else prompt.mask_input.to(embeddings.device)
            prompts = Prompts(prompt.points, prompt.labels, prompt.boxes, mask_input)
            logits, _ = model.decode(embeddings[i : i + 1], prompts, image_features=features[i])
            totals.append(
                point_sampled_loss(
                    logits[:, :1].float(),
                    sample.target[None].to(logits.device),
                    generators[i],
                    num_points=loss_config.num_points,
                    oversample_ratio=loss_config.oversample_ratio,
                    importance_sample_ratio=loss_config.importance_sample_ratio,
                )
            )
        bce = torch.stack([t.bce for t in totals]).mean()
        dice = torch.stack([t.dice for t in totals]).mean()
        return bce + dice, bce.detach(), dice.detach()


def prompts_for_model(model: SegmentAnything, prompts: PromptConfig) -> PromptConfig:
    """`prompts` as `model` takes them, each change said once: without the noisy-mask prompts for a model that takes
    no mask input, and at most as many points as a model with a fixed point count embeds (EfficientSAM: 6).

    Raises:
        ValueError: no prompt kind is left.
    """
    name = type(model).__name__
    if not model.takes_mask_input and "noise_mask" in prompts.kinds:
        kinds = tuple(kind for kind in prompts.kinds if kind != "noise_mask")
        if not kinds:
            raise ValueError(f"[prompts] kinds: {name} takes no mask input; add box or points")
        print(f"[prompts] kinds: noise_mask left out ({name} takes no mask input)", file=sys.stderr)
        prompts = dataclasses.replace(prompts, kinds=kinds)
    count = model.fixed_prompt_points()
    if count is not None and prompts.max_points > count and "points" in prompts.kinds:
        print(f"[prompts] max_points: {count} ({name} embeds at most {count} points)", file=sys.stderr)
        prompts = dataclasses.replace(prompts, max_points=count)
    return prompts


class Trainer:
    """Fine-tunes the adapters of a `TrainConfig` on a frozen base model (see docs/training.md)."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.dist = Distributed.from_environment()
        self.device = device = self.dist.join(torch.device(config.run.device))
        model = load_sam(config.model.weights, device, fast=False)  # training runs the reference chains
        model.eval()  # the base stays in inference behaviour (TinyViT BatchNorm statistics)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model = model
        with seeded_global_rng(config.run.seed, device):  # new adapter weights: the same in every process and run
            self.adapters = build_adapters(config, model)
        for adapter in self.adapters.values():
            adapter.to(device)
            adapter.inject()
            for parameter in adapter.parameters():
                parameter.requires_grad_(True)
        self.loss = AdapterLoss(model, self.adapters, config)
        trainable = {id(p) for p in self.loss.parameters()}
        self.encoder_trains = any(id(p) in trainable for p in model.image_encoder.parameters())
        self.step_loss: nn.Module = (
            DistributedDataParallel(self.loss, device_ids=[device.index] if device.type == "cuda" else None)
            if self.dist.world > 1
            else self.loss
        )
        optim = config.optim
        self.optimizer = torch.optim.Adam(self.loss.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, optim.lr_drop_epoch, optim.gamma)

        pairs = list_pairs(config.data.train)
        check_masks(pairs)
        if len(pairs) < optim.batch_size:
            raise ValueError(f"{config.data.train}: {len(pairs)} samples, fewer than batch_size {optim.batch_size}")
        if optim.batch_size % self.dist.world:
            raise ValueError(f"batch_size {optim.batch_size} does not split over {self.dist.world} processes")
        size, low = model.config.image_size, model.config.mask_input_size
        # the input frame of the model's own preprocessing (SAM 2 and EfficientSAM squash the image to a square)
        prompts = prompts_for_model(model, config.prompts)
        self.data = TrainingSet(pairs, config.data, prompts, size, low, config.run.seed, model.input_frame)
        self.steps_per_epoch = len(pairs) // optim.batch_size  # the last incomplete batch is dropped
        self.total_steps = self.steps_per_epoch * optim.epochs
        self.out = config.run.out
        self.cache = self._cache() if config.data.cache and not self.encoder_trains else None
        self.step = 0
        self.rows: list[dict[str, float]] = []
        if resume:
            self._resume()
        elif (self.out / CHECKPOINT).exists():
            raise ValueError(f"{self.out} already holds a run: resume it (--resume) or choose another [run] out")

    def _cache(self) -> EmbeddingCache:
        image_keys = sorted(self.model.use_context("image"))
        key = {
            "weights": weights_digest(self.model.image_encoder.state_dict()),
            "size": self.model.config.image_size,
            "dtype": str(self.model.image_encoder.dtype),
            "features": image_keys,
        }
        return EmbeddingCache(self.out / "embedding-cache", key)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        state = {
            "step": self.step,
            "adapters": {name: adapter.state_dict() for name, adapter in self.adapters.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "metrics": self.rows,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.out / CHECKPOINT, lambda tmp: tmp.write_bytes(buffer.getvalue()))

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise ValueError(f"nothing to resume: {path} does not exist")
        if (problem := checkpoint_problem(path)) is not None:
            raise ValueError(f"{path}: {problem}; cannot resume (start again without --resume)")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            if not (
                isinstance(state, dict) and {"adapters", "optimizer", "scheduler", "step", "metrics"} <= set(state)
            ):
                raise ValueError("not a finesam training checkpoint")
        except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: cannot resume from it ({detail}); start again without --resume") from None
        if sorted(state["adapters"]) != sorted(self.adapters):
            raise ValueError(f"{path} trained {sorted(state['adapters'])}, the config trains {sorted(self.adapters)}")
        for name, adapter in self.adapters.items():
            adapter.load_state_dict(state["adapters"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.rows = [row for row in state["metrics"] if row["step"] <= self.step]

    # -- one step -------------------------------------------------------------------------------------------

    def _batch(self, step: int) -> tuple[int, list[int]]:
        """The epoch of `step` and this process's share of its global batch (the same for any world size)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.data), generator=sample_generator(self.config.run.seed, epoch, -1, "order"))
        size = self.config.optim.batch_size
        batch = order[position * size : (position + 1) * size].tolist()
        return epoch, batch[self.dist.rank :: self.dist.world]

    def _encode(self, samples: list[Sample]) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Embeddings and per-image features, from the cache where possible; with gradients only if an
        adapter trains inside the encoder."""
        results: list[tuple[Tensor, dict[str, Tensor]] | None] = [None] * len(samples)
        if self.cache is not None:
            results = [self.cache.get(s.image_path) for s in samples]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            pixels = torch.stack([samples[i].pixels for i in missing]).to(self.device, self.model.image_encoder.dtype)
            pixels = self.model.encoder_input_from_frame(pixels)  # samples are drawn in the prompt frame
            with torch.set_grad_enabled(self.encoder_trains):
                embeddings = self.model.encode(pixels)
            features = self.model.image_features()
            for j, i in enumerate(missing):
                mine = {k: v[j : j + 1] for k, v in features.items() if isinstance(v, Tensor)}
                results[i] = (embeddings[j : j + 1], mine)
                if self.cache is not None:
                    self.cache.put(samples[i].image_path, embeddings[j : j + 1], mine)
        done = [r for r in results if r is not None]
        embeddings = torch.cat([e.to(self.device) for e, _ in done])
        return embeddings, [{k: v.to(self.device) for k, v in f.items()} for _, f in done]

    def train_step(self) -> dict[str, float]:
        epoch, indices = self._batch(self.step)
        samples = [self.data.sample(i, epoch) for i in indices]
        embeddings, features = self._encode(samples)
        generators = [sample_generator(self.config.run.seed, epoch, i, "loss") for i in indices]
        loss, bce, dice = self.step_loss(embeddings, features, samples, generators)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        values = torch.stack([loss.detach(), bce, dice])
        if self.dist.world > 1:
            dist.all_reduce(values)
            values /= self.dist.world
        self.step += 1
        if self.step % self.steps_per_epoch == 0:
            self.scheduler.step()
        return {"loss": values[0].item(), "bce": values[1].item(), "dice": values[2].item()}

    # -- the run ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Path]:
        """Trains to the end (from where a resumed run stopped); returns the adapter files written."""
        start, started = self.step, time.perf_counter()
        # subnormal floats (tiny gradients) make CPU kernels much slower; flushing them to zero changes
        # nothing measurable (they are below 1.2e-38)
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            while self.step < self.total_steps:
                self._one_step(start, started)
        finally:
            if flush:
                torch.set_flush_denormal(False)
        written: dict[str, Path] = {}
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            written = {name: save_adapter(a, self.out, name) for name, a in self.adapters.items()}
            self._write_metrics()
            if self.progress:
                print(file=sys.stderr)
        if self.dist.world > 1:
            dist.barrier()
            # DDP's reducer holds the process group: let both go while Python is fully alive, not at interpreter
            # exit, where gloo's worker threads may abort the process
            self.step_loss = self.loss
            gc.collect()
            dist.destroy_process_group()
        return written

    def _one_step(self, start: int, started: float) -> None:
        run = self.config.run
        lr = self.optimizer.param_groups[0]["lr"]
        values = self.train_step()
        if self.step % run.log_every == 0 or self.step == self.total_steps:
            elapsed = time.perf_counter() - started
            rate = (self.step - start) * self.config.optim.batch_size / max(elapsed, 1e-9)
            self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": lr, **values}, rate)
        if (self.step % run.checkpoint_every == 0 or self.step == self.total_steps) and self.dist.main:
            self._checkpoint()

    def _log(self, row: dict[str, float], rate: float) -> None:
        if not self.dist.main:
            return
        self.rows.append({**row, "samples_per_s": rate})
        self._write_metrics()
        if self.progress:
            width = len(str(self.total_steps))
            line = (
                f"step {self.step:{width}d}/{self.total_steps} epoch {math.ceil(row['epoch']):d}/"
                f"{self.config.optim.epochs} loss {row['loss']:.4f} (bce {row['bce']:.4f} dice {row['dice']:.4f}) "
                f"{rate:.2f} samples/s"
            )
            end = "\r" if sys.stderr.isatty() else "\n"
            print(line, end=end, file=sys.stderr, flush=True)

    def _write_metrics(self) -> None:
        if not self.rows:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.out / "metrics.csv", lambda tmp: tmp.write_text(text.getvalue()))
        atomic_write(self.out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(self.rows, indent=1)))
        plot_loss([int(r["step"]) for r in self.rows], [r["loss"] for r in self.rows], self.out / "loss.png")


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Path]:
    """Runs a training configuration (see `Trainer`)."""
    return Trainer(config, resume=resume, progress=progress).run()
