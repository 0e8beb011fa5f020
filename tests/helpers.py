"""Helpers for the op tests: layouts to run over, native-op detection."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t`, stored in the named layout.

    contiguous; channels_last (4-D only); transposed (dense but permuted); strided (a view with
    gaps, not dense); expanded is left to the tests that need stride 0.
    """
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        assert t.dim() == 4
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        if t.dim() < 2:
            return t.contiguous()
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":
        if t.dim() == 0:
            return t
        big = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        view = big[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(layout)


def aten_ops_called(fn, *args, **kwargs) -> tuple[object, set[str]]:
    """Run fn under the profiler and return (its result, the names of every op it dispatched)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args, **kwargs)
    return out, {e.name for e in prof.events()}


def assert_no_native(names: Iterable[str], forbidden: Iterable[str], what: str) -> None:
    hits = sorted(set(names) & set(forbidden))
    assert not hits, f"{what} called native ops it must replace: {hits}"


def assert_raises_like_torch(ours, theirs, *, contains: str | None = None) -> None:
    """Both calls raise; ours raises the same exception type with torch's message (first line).

    `contains` overrides the text to look for where dlext words a message differently on purpose.
    """
    import pytest

    with pytest.raises(Exception) as native:
        theirs()
    expected = contains if contains is not None else str(native.value).splitlines()[0].strip()
    with pytest.raises(native.type) as got:
        ours()
    assert expected in str(got.value), f"expected {expected!r} in {str(got.value)!r}"
