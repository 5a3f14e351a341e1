"""Key maps: each tensor of a finesam module made from named tensors of an official `state_dict`.

A map is built from (official prefix, finesam module) pairs found by the structure of the chains, so it reads
like the official model; applying it checks every key and shape.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.text import listing
from finesam.weights.io import CheckpointError, dtype_problems


@dataclass(frozen=True)
class Rule:
    """One finesam tensor made from one or more official tensors."""

    sources: tuple[str, ...]
    combine: Callable[..., Tensor] = lambda t: t


def rules_for(root: torch.nn.Module, pairs: list[tuple[str, fl.Module]]) -> dict[str, Rule]:
    """One-to-one rules for (official prefix, module of `root`) pairs: every parameter keeps its name."""
    names = {id(module): name for name, module in root.named_modules()}
    return {
        f"{names[id(module)]}.{tensor}": Rule((f"{prefix}.{tensor}",))
        for prefix, module in pairs
        for tensor in _persistent_tensors(module)
    }


def _persistent_tensors(module: torch.nn.Module) -> list[str]:
    """Names of a module's own parameters and saved buffers (BatchNorm statistics, for instance)."""
    buffers = [
        name for name, _ in module.named_buffers(recurse=False) if name not in module._non_persistent_buffers_set
    ]
    return [name for name, _ in module.named_parameters(recurse=False)] + buffers


def _source_dtypes(rules: Mapping[str, Rule], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """For each official key, a tensor of the dtype its target has (what `dtype_problems` compares with)."""
    return {s: expected[target] for target, rule in rules.items() for s in rule.sources}


def apply_rules(
    official: Mapping[str, Tensor],
    rules: Mapping[str, Rule],
    expected: Mapping[str, Tensor],
    ignore: Callable[[str], bool] = lambda _: False,
) -> dict[str, Tensor]:
    """Builds the `expected` tensors from an official `state_dict`, checking every key and shape.

    Raises `CheckpointError` naming the missing, unexpected (not `ignore`d) and mis-shaped keys.
    """
    missing = sorted({s for rule in rules.values() for s in rule.sources if s not in official})
    used = {s for rule in rules.values() for s in rule.sources}
    unexpected = sorted(k for k in official if k not in used and not ignore(k))
    converted: dict[str, Tensor] = {}
    misshaped: list[str] = []
    # integer weights where the model has float ones (or the reverse) are no checkpoint of it; other float
    # precisions are cast below
    wrong = dtype_problems({k: official[k] for k in used if k in official}, _source_dtypes(rules, expected))
    if not missing and not wrong:
        for target, rule in rules.items():
            try:
                tensor = rule.combine(*(official[s] for s in rule.sources))
            except RuntimeError as e:
                misshaped.append(f"{'+'.join(rule.sources)} ({e})")
                continue
            if tensor.shape != expected[target].shape:
                sources = " + ".join(f"{s} {tuple(official[s].shape)}" for s in rule.sources)
                misshaped.append(f"{sources} -> expected {tuple(expected[target].shape)}")
                continue
            converted[target] = tensor.to(expected[target].dtype).contiguous()
    problems = []
    if wrong:
        problems.append(f"tensors of the wrong dtype: {listing(wrong, 3)}")
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {listing(misshaped)}")
    if problems:
        raise CheckpointError("checkpoint does not match the expected layout; " + "; ".join(problems))
    assert converted.keys() == expected.keys()
    return converted
