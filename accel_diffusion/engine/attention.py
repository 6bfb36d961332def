"""Attention backend selection: xformers memory-efficient attention on CUDA when installed, else SDPA."""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

import torch
from diffusers import ModelMixin
from diffusers.models.attention_processor import AttnProcessor2_0

logger = logging.getLogger(__name__)

AttentionPreference = Literal["auto", "sdpa", "xformers"]


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def configure_attention(models: list[ModelMixin], device: torch.device, preference: AttentionPreference) -> str:
    """Set the attention processors of ``models`` and return the backend in use ("xformers" or "sdpa").

    xformers has no CPU kernels, so it is only used on CUDA; asking for it elsewhere (or without the
    package) falls back to torch's scaled_dot_product_attention with a warning.
    """
    use_xformers = preference in ("auto", "xformers") and device.type == "cuda" and xformers_available()
    if preference == "xformers" and not use_xformers:
        reason = "no CUDA device" if device.type != "cuda" else "the xformers package is not installed"
        logger.warning("xformers attention requested but unavailable (%s); using torch SDPA", reason)
    for model in models:
        if not hasattr(model, "set_attn_processor") or not getattr(model, "attn_processors", None):
            continue
        if use_xformers:
            model.enable_xformers_memory_efficient_attention()
        else:
            model.set_attn_processor(AttnProcessor2_0())
    return "xformers" if use_xformers else "sdpa"
