"""Cross-attention with cached text keys and values (DistriFusion): the text is the same at every step
of a generation, so its K and V are computed at the first step and reused (``distrifusion``, ``pcpp``).

The cache is keyed by the encoder states' storage and shape (the engine's ``Conditioning`` passes the
same stacked tensor at every step) and emptied at the start of every generation.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from accel_diffusion.parallel.context import PatchContext
from accel_diffusion.parallel.self_attention import attend


class CachedCrossAttnProcessor:
    def __init__(self, context: PatchContext, original: Any) -> None:
        self.context = context
        self.original = original
        self._cache: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        self._cache.clear()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        context = self.context
        if (not context.active or context.mode not in ("distrifusion", "pcpp") or encoder_hidden_states is None
                or attention_mask is not None or hidden_states.dim() != 3 or attn.norm_cross):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        key_id = (encoder_hidden_states.data_ptr(), tuple(encoder_hidden_states.shape))
        if key_id not in self._cache:
            self._cache[key_id] = (attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states))
        key, value = self._cache[key_id]
        return attend(attn, attn.to_q(hidden_states), key, value, hidden_states)
