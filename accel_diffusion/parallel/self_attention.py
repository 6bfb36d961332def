"""Self-attention on a row patch: queries from this patch's tokens, keys and values from beyond it.

A diffusers ``Attention`` processor. The patch's tokens are its rows in row-major order, so the
ranks' tokens concatenated in rank order are the image's tokens in order.

- ``full_sync`` / ``distrifusion``: every rank's K and V, fused into one (B, L/N, 2 C) tensor per rank
  (DistriFusion's ``to_kv``), are all-gathered; this rank's slot is always its fresh K, V, the others
  are fresh (synchronous steps) or one step stale (displaced steps).
- ``pcpp``: K, V = the ``rho`` fraction of rows of patch i - 1 nearest the seam (its bottom rows), this
  patch (fresh), and the ``rho`` fraction of rows of patch i + 1 nearest it (its top rows), sent point to
  point by those two neighbours; ``max(1, round(rho h))`` rows of a patch of h rows at the layer's
  resolution. Edge patches have one neighbour. Reconstruction of arXiv 2412.02962, which has no public
  code (see docs/parallel.md).
- ``naive``: this patch's tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from accel_diffusion.parallel.context import PatchContext
from accel_diffusion.parallel.exchange import Exchange


def check_convertible(attn: Attention, name: str) -> None:
    unsupported = [field for field in ("spatial_norm", "group_norm", "norm_q", "norm_k")
                   if getattr(attn, field, None) is not None]
    if unsupported:
        raise NotImplementedError(f"patch-parallel self-attention does not support {', '.join(unsupported)} "
                                  f"(in {name})")


def neighbour_rows(rho: float, rows: int) -> int:
    """Rows of a neighbour's patch of ``rows`` rows that PCPP shares: the ``rho`` fraction, at least one."""
    return min(rows, max(1, round(rho * rows)))


def attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           residual: torch.Tensor) -> torch.Tensor:
    """diffusers' ``AttnProcessor2_0`` from the projected (B, tokens, C) query, keys and values on."""
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class PatchSelfAttnProcessor:
    def __init__(self, context: PatchContext, original: Any) -> None:
        self.context = context
        self.original = original
        self.exchange = Exchange(context, "attention_kv")

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.context.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if hidden_states.dim() != 3 or encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("patch-parallel self-attention takes (B, tokens, C) hidden states, "
                                      "no encoder states and no mask")
        residual = hidden_states
        query = attn.to_q(hidden_states)
        key_value = torch.cat([attn.to_k(hidden_states), attn.to_v(hidden_states)], dim=-1)
        if self.context.exchanges:
            key_value = self._gather(key_value)
        key, value = key_value.chunk(2, dim=-1)
        return attend(attn, query, key, value, residual)

    def _gather(self, key_value: torch.Tensor) -> torch.Tensor:
        context = self.context
        if context.mode == "pcpp":
            width = context.level_width(key_value.shape[1])
            shared = neighbour_rows(context.rho, key_value.shape[1] // width) * width
            above, below = self.exchange.neighbours(key_value[:, :shared], key_value[:, -shared:])
            return torch.cat([t for t in (above, key_value, below) if t is not None], dim=1)
        parts = list(self.exchange.all_gather(key_value))
        parts[context.rank] = key_value
        return torch.cat(parts, dim=1)
