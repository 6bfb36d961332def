"""Batch-invariant execution: an image's pixels do not depend on what else shares its batch.

Running requests together is only safe for a server if an image comes out the same as when it ran
alone. The per-image seeds make the *inputs* equal; the kernels do the rest, and they are not
batch-invariant: a matrix multiply with M = 1 rows takes a GEMV path, with M = 4 a GEMM path
that reduces in another order; oneDNN picks another convolution algorithm for another batch size
(measured on the `shapes` UNet's 4-channel input convolution); GroupNorm takes its channels-last
kernel when a slice of a batch has channels-last strides while the lone tensor does not. Each of
these changes the last bits of float32 results, which is enough to move a pixel by one level.

``BatchInvariantOps`` covers the reduction-carrying functions below (elementwise operators
compute each element on its own, and row-wise reductions never span samples). Their operands are
made contiguous, alone or in a batch, so both agree on memory format. The first time a function
meets a new signature (function, unit, shapes, strides, dtypes, arguments, thread count) it runs
both ways, on the whole batch and unit by unit, and keeps the verdict:

- bit-identical: the kernel is batch-invariant for that signature, and from then on the batch runs
  in one call (most token-matrix GEMMs are);
- different: the function runs unit by unit for that signature, so that every sample goes through
  the very kernel call (same shapes, same strides) it would get alone (most oneDNN convolutions).

Kernels are deterministic functions of their signature, and a different reduction order shows on
almost every element of real activations, so the verdict of one real call holds for the next.

The unit of splitting is ``unit`` consecutive rows, normally 1. The denoising loop stacks an
image's guidance branches (uncond, cond) next to each other and sets ``unit`` to their number for
the model call (``grouped``): a lone image is then one unit and runs unsplit, and in a batch every
image runs the very call it would run alone.

How: the first use installs thin wrappers over ``torch.nn.functional.linear``, ``conv1d/2d/3d``,
``conv_transpose2d``, ``group_norm``, ``scaled_dot_product_attention`` and ``torch.bmm`` /
``torch.baddbmm`` (which diffusers and torch.nn call through those module attributes). A wrapper
costs one thread-local lookup when no mode is active on its thread and passes straight through.
(A ``TorchFunctionMode`` would see every operator: it cost 16% of a `shapes` generation on the
2-core CPU, against ~0% for these wrappers.) Modes are per thread: entering one on a worker thread
affects only that thread (``active()`` returns it there); verdicts are shared by all threads.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

# (module, function name) -> (how many leading positional arguments carry the batch dimension, the
# rank they have when batched: a 3-D conv2d input is one unbatched image)
_TARGETS: dict[tuple[ModuleType, str], tuple[int, int]] = {
    (F, "linear"): (1, 2),
    (F, "conv1d"): (1, 3),
    (F, "conv2d"): (1, 4),
    (F, "conv3d"): (1, 5),
    (F, "conv_transpose2d"): (1, 4),
    (F, "group_norm"): (1, 2),
    (F, "scaled_dot_product_attention"): (3, 3),
    (torch, "bmm"): (2, 3),
    (torch, "baddbmm"): (3, 3),
}
_ORIGINALS: dict[tuple[ModuleType, str], Callable[..., Any]] = {}
_INSTALL_LOCK = threading.Lock()

# A 2-D linear input is a batch of rows only up to this many rows: (batch, features) inputs such as
# timestep embeddings, where M = batch picks GEMV vs GEMM. A token matrix flattened to
# (batch * tokens, features) is left alone: one-row calls would cost thousands of kernel calls.
MAX_SPLIT_ROWS = 64

# signature -> True when the batched call equals the per-unit calls bit for bit
_VERDICTS: dict[tuple[Any, ...], bool] = {}
_MAX_VERDICTS = 100_000
_ACTIVE = threading.local()


def active() -> BatchInvariantOps | None:
    """The mode entered on this thread, if any."""
    stack = getattr(_ACTIVE, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Leave the mode active on this thread, if any, for work that is not part of its batch (a stream
    frame run between a job's steps must not pay for the job's row-by-row kernels)."""
    stack = getattr(_ACTIVE, "stack", [])
    _ACTIVE.stack = []
    try:
        yield
    finally:
        _ACTIVE.stack = stack


class BatchInvariantOps:
    """Within this context (on this thread), every unit (sample) of a batch gets the bits it would get alone."""

    def __init__(self) -> None:
        self.unit = 1
        install()

    def __enter__(self) -> BatchInvariantOps:
        _ACTIVE.stack = [*getattr(_ACTIVE, "stack", []), self]
        return self

    def __exit__(self, *exc_info: object) -> None:
        _ACTIVE.stack = _ACTIVE.stack[:-1]

    @contextlib.contextmanager
    def grouped(self, unit: int) -> Iterator[None]:
        """Split into units of ``unit`` consecutive rows (one image's branches) instead of single rows."""
        previous, self.unit = self.unit, unit
        try:
            yield
        finally:
            self.unit = previous

    def call(self, func: Callable[..., torch.Tensor], count: int, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> torch.Tensor:
        """``func(*args, **kwargs)`` with its first ``count`` (batched) operands, batch-invariantly."""
        args = (*(a.contiguous() for a in args[:count]), *args[count:])
        batch, unit = args[0].shape[0], self.unit
        if batch <= unit or batch % unit:  # one unit, or rows that are not units of samples
            return func(*args, **kwargs)
        signature = (unit, *_signature(func, args, kwargs))
        verdict = _VERDICTS.get(signature)
        if verdict is True:
            return func(*args, **kwargs)
        per_unit = _per_unit(func, count, unit, args, kwargs)
        if verdict is None:
            if len(_VERDICTS) >= _MAX_VERDICTS:
                _VERDICTS.clear()
            _VERDICTS[signature] = torch.equal(func(*args, **kwargs), per_unit)
        return per_unit


def install() -> None:
    """Put the wrappers in place (once per process); they pass through where no mode is active."""
    with _INSTALL_LOCK:
        if _ORIGINALS:
            return
        for (owner, name), (count, rank) in _TARGETS.items():
            original = getattr(owner, name)
            _ORIGINALS[(owner, name)] = original
            setattr(owner, name, _wrapper(original, count, rank, linear=(owner, name) == (F, "linear")))


def _wrapper(func: Callable[..., Any], count: int, rank: int, linear: bool) -> Callable[..., Any]:
    @functools.wraps(func)
    def batch_invariant(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # a compiled graph (engine/compiled.py) calls the kernel itself
            return func(*args, **kwargs)
        stack = getattr(_ACTIVE, "stack", None)
        if not stack or not _batched(args, count, rank, linear):
            return func(*args, **kwargs)
        return stack[-1].call(func, count, args, kwargs)

    return batch_invariant


def _batched(args: tuple[Any, ...], count: int, rank: int, linear: bool) -> bool:
    if len(args) < count or not all(isinstance(a, torch.Tensor) and a.dim() >= rank for a in args[:count]):
        return False
    if linear and args[0].dim() == 2 and args[0].shape[0] > MAX_SPLIT_ROWS:
        return False
    return all(a.shape[0] == args[0].shape[0] for a in args[1:count])  # else broadcast: not a batch


def _per_unit(func: Callable[..., torch.Tensor], count: int, unit: int, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> torch.Tensor:
    """``func`` evaluated unit by unit over dim 0 of its first ``count`` arguments."""
    batch = args[0].shape[0]
    mask = kwargs.get("attn_mask")  # SDPA: a per-sample mask is split with the samples
    split_mask = isinstance(mask, torch.Tensor) and mask.dim() >= 3 and mask.shape[0] == batch
    outputs = []
    for start in range(0, batch, unit):
        rows = slice(start, start + unit)
        if split_mask:
            kwargs = {**kwargs, "attn_mask": mask[rows].contiguous()}  # type: ignore[index]
        outputs.append(func(*(a[rows] for a in args[:count]), *args[count:], **kwargs))
    return torch.cat(outputs)


def _signature(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return (func, torch.get_num_threads(), tuple(_key(a) for a in args),
            tuple((k, _key(v)) for k, v in sorted(kwargs.items())))


def _key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, list | tuple):
        return tuple(_key(v) for v in value)
    return value
