"""Hardware-neutral instruments for decoding cost, shared by the tests and the benchmarks.

- :func:`count_host_reads`: every Tensor method that reads a value back to the host
  (``__bool__``, ``item``, ``tolist``, ``__int__``, ``__float__``, ``__index__``, ``cpu``,
  ``numpy``) called while a pattern editor runs; on CUDA each stalls the launch queue.
- :func:`count_ops`: the non-view aten operators dispatched inside a block (each is a kernel
  launch on a GPU; a batch-1 decode is paced by them), optionally only inside pattern editors.

No GPU is needed: both count where the cost starts.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dleaf_analysis import hooks

SYNCING = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy")
_inside = [0]


@contextmanager
def _editors_marked() -> Iterator[None]:
    """Wrap every editor attached in the block so that ``_inside`` says when one is running (wrapped
    where it is attached, so it does not depend on how the hook point's forward is dispatched)."""
    orig = hooks.attach_editor

    def attach_editor(model, editor, inputs=None):
        def counted(pattern, ctx):
            _inside[0] += 1
            try:
                return editor(pattern, ctx)
            finally:
                _inside[0] -= 1
        return orig(model, counted, inputs)

    hooks.attach_editor = attach_editor
    try:
        yield
    finally:
        hooks.attach_editor = orig


@contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Yields a list that collects the name of every host read made while a pattern editor runs."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def make(name, fn):
        def wrapped(self, *a, **k):
            if _inside[0]:
                calls.append(name)
            return fn(self, *a, **k)
        return wrapped

    with _editors_marked():
        for name, fn in saved.items():
            setattr(torch.Tensor, name, make(name, fn))
        try:
            yield calls
        finally:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)


_VIEW_OPS = {"view", "_unsafe_view", "expand", "as_strided", "t", "transpose", "permute", "unsqueeze", "squeeze",
             "select", "slice", "alias", "detach", "reshape", "_reshape_alias", "unbind", "split", "split_with_sizes",
             "chunk", "narrow", "diagonal", "expand_as", "view_as", "lift_fresh", "unfold", "_to_copy_view"}


class _OpCounter(TorchDispatchMode):
    def __init__(self, editors_only: bool) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.editors_only = editors_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _VIEW_OPS and (not self.editors_only or _inside[0]):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_ops(editors_only: bool = False) -> Iterator[Counter]:
    """Yields a Counter of the non-view aten operators dispatched in the block (``editors_only``:
    only those dispatched inside pattern editors)."""
    mode = _OpCounter(editors_only)
    with _editors_marked(), mode:
        yield mode.counts
