"""Attention backend selection: xformers memory-efficient attention on CUDA when installed, else SDPA;
and the attention batch-invariant mode runs whatever was selected: SDPA, under its wrappers."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from diffusers import ModelMixin
from diffusers.models.attention_processor import (
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
    XFormersAttnAddedKVProcessor,
    XFormersAttnProcessor,
)

logger = logging.getLogger(__name__)

AttentionPreference = Literal["auto", "sdpa", "xformers"]
AttentionBackend = Literal["xformers", "sdpa"]

# Processors whose every reduction runs through a function BatchInvariantOps wraps
# (F.scaled_dot_product_attention, or torch.baddbmm / torch.bmm, with F.linear for the projections).
PROVABLE_PROCESSORS: tuple[type, ...] = (AttnProcessor2_0, AttnProcessor, AttnAddedKVProcessor2_0,
                                         AttnAddedKVProcessor)
# xformers' kernel (xformers.ops.memory_efficient_attention) is outside the wrappers: its SDPA equivalent
SDPA_EQUIVALENTS: dict[type, type] = {XFormersAttnProcessor: AttnProcessor2_0,
                                      XFormersAttnAddedKVProcessor: AttnAddedKVProcessor2_0}


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def select_backend(preference: AttentionPreference, device_type: str, xformers_installed: bool) -> AttentionBackend:
    """The backend a model is loaded with: xformers for "auto" or "xformers" on CUDA when it is installed, else
    SDPA (xformers has no CPU kernels)."""
    use_xformers = preference in ("auto", "xformers") and device_type == "cuda" and xformers_installed
    return "xformers" if use_xformers else "sdpa"


def configure_attention(models: list[ModelMixin], device: torch.device, preference: AttentionPreference) -> str:
    """Set the attention processors of ``models`` and return the backend in use ("xformers" or "sdpa").

    xformers has no CPU kernels, so it is only used on CUDA; asking for it elsewhere (or without the
    package) falls back to torch's scaled_dot_product_attention with a warning.
    """
    backend = select_backend(preference, device.type, xformers_available())
    if preference == "xformers" and backend != "xformers":
        reason = "no CUDA device" if device.type != "cuda" else "the xformers package is not installed"
        logger.warning("xformers attention requested but unavailable (%s); using torch SDPA", reason)
    for model in models:
        if not hasattr(model, "set_attn_processor") or not getattr(model, "attn_processors", None):
            continue
        if backend == "xformers":
            model.enable_xformers_memory_efficient_attention()
        else:
            model.set_attn_processor(AttnProcessor2_0())
    return backend


def batch_invariant_processors(processors: dict[str, Any]) -> dict[str, Any] | None:
    """The processors the batch-invariant mode runs instead of ``processors`` (name -> processor): an xformers
    processor becomes its SDPA equivalent, whose kernel call the mode wraps; a provable one stays. None when
    nothing changes. A processor of another kind stays, with a warning: the mode cannot prove it."""
    replaced, changed = {}, False
    for name, processor in processors.items():
        equivalent = SDPA_EQUIVALENTS.get(type(processor))
        if equivalent is not None:
            replaced[name], changed = equivalent(), True
            continue
        if not isinstance(processor, PROVABLE_PROCESSORS):
            logger.warning("attention processor %s (%s) is not one the batch-invariant mode can prove: its kernels "
                           "are outside the mode's wrappers", name, type(processor).__name__)
        replaced[name] = processor
    return replaced if changed else None


class _Swap:
    """One model's batch-invariant swap, worked out once: its attention layers (found by one walk of its module
    tree, which does not change after loading), their processors when the swap was worked out, and the
    processors the mode runs instead (None: nothing to change, the usual case of a model loaded with SDPA)."""

    __slots__ = ("layers", "originals", "replacements")

    def __init__(self, model: Any) -> None:
        named = _attention_layers(model)
        self.layers = tuple(layer for _, layer in named)
        self.originals = tuple(layer.processor for layer in self.layers)
        replaced = batch_invariant_processors({name: layer.processor for name, layer in named})
        self.replacements = None if replaced is None else tuple(replaced.values())

    def current(self) -> bool:
        """Whether the layers still run the processors the swap was worked out for (one identity check each)."""
        return all(layer.processor is original for layer, original in zip(self.layers, self.originals, strict=True))


# model -> its swap; a model whose processors changed since (configure_attention again) gets a new one
_SWAPS: weakref.WeakKeyDictionary[Any, _Swap] = weakref.WeakKeyDictionary()


def _attention_layers(model: Any) -> list[tuple[str, Any]]:
    """The model's attention layers by processor name, in the order of diffusers' ``attn_processors``."""
    layers: list[tuple[str, Any]] = []

    def visit(name: str, module: Any) -> None:
        if hasattr(module, "get_processor"):
            layers.append((f"{name}.processor", module))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}", child)

    if hasattr(model, "set_attn_processor"):
        for name, child in model.named_children():
            visit(name, child)
    return layers


def _swap(model: Any) -> _Swap:
    swap = _SWAPS.get(model)
    if swap is None or not swap.current():
        swap = _SWAPS[model] = _Swap(model)
    return swap


@contextlib.contextmanager
def batch_invariant_attention(models: Sequence[Any]) -> Iterator[AttentionBackend]:
    """Within this context, ``models`` attend through processors the batch-invariant mode can prove (SDPA
    under its wrappers, even on CUDA with xformers installed); their own processors come back after. Yields the
    backend that runs ("sdpa"). Only the thread that owns the models may use them meanwhile (the worker does).

    What to swap is worked out once per model (a walk of its module tree cost ~1 ms per call on the `shapes`
    model) and reused while its layers keep the processors it was worked out for."""
    swapped: list[_Swap] = []
    try:
        for model in models:
            swap = _swap(model)
            if swap.replacements is not None:
                swapped.append(swap)
                for layer, processor in zip(swap.layers, swap.replacements, strict=True):
                    layer.set_processor(processor)
        yield "sdpa"
    finally:
        for swap in reversed(swapped):
            for layer, original in zip(swap.layers, swap.originals, strict=True):
                layer.set_processor(original)
