"""Swap the supported torch.nn layers of any model for dlext's, in place, and back.

A dlext layer is a subclass of its torch.nn twin that only overrides forward, so swapping is a
change of class: every module keeps its identity, parameters, buffers, hooks, training mode and
attributes, and optimizers that hold its parameters keep working. Only layers whose type is exactly
the torch.nn class are swapped (a user's own subclass may override forward and is left alone).

    model = dlext.swap_layers(torchvision.models.resnet50())
    print(model.dlext_swapped)        # what was swapped: {qualified name: "Conv2d", ...}
    dlext.restore_layers(model)       # back to torch.nn
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn


def _swappable() -> dict[type, type]:
    import dlext.nn as DN
    pairs = {}
    for name in DN.__all__:
        ours = getattr(DN, name)
        twin = getattr(nn, name, None)
        if isinstance(ours, type) and twin is not None and issubclass(ours, twin):
            pairs[twin] = ours
    return pairs


def _matches(name: str, module: nn.Module, rules: Iterable) -> bool:
    for rule in rules:
        if isinstance(rule, type) and isinstance(module, rule):
            return True
        if isinstance(rule, str) and (fnmatch.fnmatchcase(name, rule)
                                      or type(module).__name__ == rule):
            return True
    return False


def swap_layers(model: nn.Module, include: Iterable | None = None,
                exclude: Iterable | None = None, verbose: bool = False) -> nn.Module:
    """Replace every supported torch.nn layer of `model` (itself included) by its dlext twin.

    include / exclude: layer classes (nn.Conv2d), class names ("BatchNorm2d") or glob patterns on
    qualified module names ("layer4.*"); a layer is swapped if it matches include (when given) and
    does not match exclude. Returns the model; `model.dlext_swapped` maps each swapped module's
    qualified name to its class name.
    """
    pairs = _swappable()
    include = list(include) if include is not None else None
    exclude = list(exclude or [])
    swapped = dict(getattr(model, "dlext_swapped", {}))
    for name, module in model.named_modules():
        target = pairs.get(type(module))
        if target is None:
            continue
        if include is not None and not _matches(name, module, include):
            continue
        if _matches(name, module, exclude):
            continue
        module.__class__ = target
        swapped[name] = target.__name__
    model.dlext_swapped = swapped
    if verbose:
        print(summary(model))
    return model


def restore_layers(model: nn.Module) -> nn.Module:
    """Turn every dlext layer of `model` back into its torch.nn twin (in place); returns model."""
    back = {ours: twin for twin, ours in _swappable().items()}
    for module in model.modules():
        twin = back.get(type(module))
        if twin is not None:
            module.__class__ = twin
    model.dlext_swapped = {}
    return model


def summary(model: nn.Module) -> str:
    swapped = getattr(model, "dlext_swapped", {})
    counts: dict[str, int] = {}
    for cls in swapped.values():
        counts[cls] = counts.get(cls, 0) + 1
    parts = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
    return f"dlext.swap_layers: {len(swapped)} layers swapped ({parts or 'none'})"
