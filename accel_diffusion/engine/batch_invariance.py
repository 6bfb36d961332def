"""Batch-invariant execution: an image's pixels do not depend on what else shares its batch.

Running requests together is only safe for a server if an image comes out the same as when it ran
alone. The per-image seeds make the *inputs* equal; the kernels do the rest, and they are not
batch-invariant: a matrix multiply with M = 1 rows takes a GEMV path, with M = 4 a GEMM path
that reduces in another order; oneDNN picks another convolution algorithm for another batch size
(measured on the `shapes` UNet's 4-channel input convolution); GroupNorm takes its channels-last
kernel when a slice of a batch has channels-last strides while the lone tensor does not. Each of
these changes the last bits of float32 results, which is enough to move a pixel by one level.

``BatchInvariantOps`` is a ``TorchFunctionMode`` over the reduction-carrying operators below
(elementwise operators compute each element on its own, and row-wise reductions never span
samples). Their operands are made contiguous, alone or in a batch, so both agree on memory format.
The first time an operator meets a new signature (operator, batch size, shapes, dtypes, arguments,
thread count) it runs both ways, on the whole batch and sample by sample, and keeps the verdict:

- bit-identical: the kernel is batch-invariant for that signature, and from then on the batch runs
  in one call (most convolutions and token-matrix GEMMs are);
- different: the operator runs sample by sample for that signature, so that every sample goes
  through the very kernel call (same shapes, same strides) it would get alone.

Kernels are deterministic functions of their signature, and a different reduction order shows on
almost every element of real activations, so the verdict of one real call holds for the next.
Cost: the double evaluation once per signature, one call per sample where a kernel is not
invariant, and the mode's per-operator dispatch. Modes are thread-local: entering one on a worker
thread affects only that thread; verdicts are shared by all threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# operator -> (how many leading positional arguments carry the batch dimension, the rank they have
# when batched: a 3-D conv2d input is one unbatched image)
_BATCHED_OPERANDS: dict[Callable[..., Any], tuple[int, int]] = {
    F.linear: (1, 2),
    F.conv1d: (1, 3),
    F.conv2d: (1, 4),
    F.conv3d: (1, 5),
    F.conv_transpose2d: (1, 4),
    F.group_norm: (1, 2),
    F.scaled_dot_product_attention: (3, 3),
    torch.bmm: (2, 3),
    torch.baddbmm: (3, 3),
}

# signature -> True when the batched call equals the per-sample calls bit for bit
_VERDICTS: dict[tuple[Any, ...], bool] = {}
_MAX_VERDICTS = 100_000


class BatchInvariantOps(TorchFunctionMode):
    """Within this mode, every sample of a batch gets the bits it would get alone."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        operands = _BATCHED_OPERANDS.get(func)
        if operands is None or not _batched(func, args, *operands):
            return func(*args, **kwargs)
        count = operands[0]
        args = (*(a.contiguous() for a in args[:count]), *args[count:])
        batch = args[0].shape[0]
        if batch == 1:
            return func(*args, **kwargs)
        signature = _signature(func, args, kwargs)
        verdict = _VERDICTS.get(signature)
        if verdict is True:
            return func(*args, **kwargs)
        per_sample = _per_sample(func, count, args, kwargs)
        if verdict is None:
            if len(_VERDICTS) >= _MAX_VERDICTS:
                _VERDICTS.clear()
            _VERDICTS[signature] = torch.equal(func(*args, **kwargs), per_sample)
        return per_sample


# A 2-D linear input is a batch of rows only up to this many rows: (batch, features) inputs such as
# timestep embeddings, where M = batch picks GEMV vs GEMM. A token matrix flattened to
# (batch * tokens, features) is left alone: one-row calls would cost thousands of kernel calls.
MAX_SPLIT_ROWS = 64


def _batched(func: Callable[..., Any], args: tuple[Any, ...], count: int, rank: int) -> bool:
    if len(args) < count or not all(isinstance(a, torch.Tensor) and a.dim() >= rank for a in args[:count]):
        return False
    if func is F.linear and args[0].dim() == 2 and args[0].shape[0] > MAX_SPLIT_ROWS:
        return False
    return all(a.shape[0] == args[0].shape[0] for a in args[1:count])  # else broadcast: not a batch


def _per_sample(func: Callable[..., torch.Tensor], count: int, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> torch.Tensor:
    """``func`` evaluated sample by sample over dim 0 of its first ``count`` arguments."""
    batch = args[0].shape[0]
    mask = kwargs.get("attn_mask")  # SDPA: a per-sample mask is split with the samples
    split_mask = isinstance(mask, torch.Tensor) and mask.dim() >= 3 and mask.shape[0] == batch
    outputs = []
    for i in range(batch):
        if split_mask:
            kwargs = {**kwargs, "attn_mask": mask[i : i + 1].contiguous()}  # type: ignore[index]
        outputs.append(func(*(a[i : i + 1] for a in args[:count]), *args[count:], **kwargs))
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
