"""The mechanism of the fast swap: a module's class is exchanged for a subclass that computes the same values
faster, and back.

A fast class subclasses one reference class, adds no parameters, buffers or children, and carries the
reference's name (`fast_version_of`), so the module's structure, `state_dict` keys and LoRA paths are the
same whichever class it has. Swapping the class of the existing object (as `torch.nn.utils.parametrize`
does) keeps it where it is in the tree, with every adapter around or inside it; `restore` puts the reference
class back and deletes what the swap added to the instance, which leaves the module exactly as it was.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import torch

FastClass = TypeVar("FastClass", bound=type)

_REFERENCE = "_fast_reference_class"
_ADDED = "_fast_added_attributes"


def fast_version_of(reference: type[torch.nn.Module]) -> Callable[[FastClass], FastClass]:
    """Declares the decorated class the fast version of `reference`: it must subclass it, and takes its name
    (refiners names children, hence `state_dict` keys and LoRA paths, by class name)."""

    def declare(fast: FastClass) -> FastClass:
        if fast.__bases__ != (reference,):
            raise TypeError(f"{fast.__name__} must subclass {reference.__name__} alone")
        fast.__name__, fast.__qualname__ = reference.__name__, reference.__qualname__
        setattr(fast, _REFERENCE, reference)
        return fast

    return declare


_BY_TYPE: dict[type, tuple[type, dict[str, Any]]] = {}


def swapped_by_type(**settings: Any) -> Callable[[FastClass], FastClass]:
    """Declares that every layer of exactly the decorated fast class's reference class takes it, with
    `settings` as its instance attributes (below `fast_version_of`, which names the reference). Layers whose
    fast version depends on where they sit (the decoder's attentions, GELU) are placed by the swap itself."""

    def register(fast: FastClass) -> FastClass:
        reference = reference_class(fast)
        if reference is None:
            raise TypeError(f"{fast.__name__} is not declared with fast_version_of")
        if reference in _BY_TYPE:
            raise ValueError(f"{reference.__name__} already has the fast version {_BY_TYPE[reference][0].__module__}")
        _BY_TYPE[reference] = (fast, settings)
        return fast

    return register


def fast_version_by_type(module: torch.nn.Module) -> tuple[type, dict[str, Any]] | None:
    """The fast class and settings every layer of `module`'s exact class takes, if one was declared."""
    return _BY_TYPE.get(type(module))


def reference_class(fast: type) -> type | None:
    """The reference class a fast class stands in for (None for any other class)."""
    return fast.__dict__.get(_REFERENCE)


def is_fast(module: torch.nn.Module) -> bool:
    """Whether `module` runs a fast version of its reference class."""
    return reference_class(type(module)) is not None


def swap(module: torch.nn.Module, fast: type, **attributes: Any) -> bool:
    """Gives `module` (of exactly `fast`'s reference class) the class `fast` and the instance `attributes` it
    reads. Returns False, changing nothing, when it already runs a fast version.

    Raises:
        TypeError: `module` is not of `fast`'s reference class.
    """
    if is_fast(module):
        return False
    if type(module) is not reference_class(fast):
        raise TypeError(f"{type(module).__name__} has no fast version {fast.__name__}")
    clashes = sorted(name for name in attributes if name in vars(module))
    if clashes:
        raise ValueError(f"{type(module).__name__} already has the attributes {clashes} of its fast version")
    module.__class__ = fast
    vars(module).update(attributes)
    vars(module)[_ADDED] = tuple(attributes)
    return True


def restore(module: torch.nn.Module) -> bool:
    """Gives a swapped `module` its reference class back and deletes what `swap` added. Returns False for a
    module that was not swapped."""
    reference = reference_class(type(module))
    if reference is None:
        return False
    for name in (*vars(module).pop(_ADDED, ()), *fast_state(module)):
        vars(module).pop(name, None)
    module.__class__ = reference
    return True


def settings(module: torch.nn.Module) -> dict[str, Any]:
    """The instance attributes `swap` gave a fast `module` (what a later `swap` needs to make it again)."""
    return {name: vars(module)[name] for name in vars(module).get(_ADDED, ())}


def fast_state(module: torch.nn.Module) -> tuple[str, ...]:
    """The instance attributes a fast class creates while it runs (memories), deleted by `restore`."""
    return tuple(getattr(type(module), "fast_state", ()))
