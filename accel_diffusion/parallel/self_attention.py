"""Self-attention on a row patch: queries from this patch's tokens, keys and values from the whole image.

A diffusers ``Attention`` processor. The patch's tokens are its rows in row-major order, so the
ranks' tokens concatenated in rank order are the image's tokens in order. ``full_sync`` all-gathers
every rank's fresh K and V, fused into one (B, L/N, 2 C) tensor per rank (DistriFusion's ``to_kv``);
``naive`` attends within the patch only. Cross-attention (text keys) is local and left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from accel_diffusion.parallel.context import PatchContext


def check_convertible(attn: Attention, name: str) -> None:
    unsupported = [field for field in ("spatial_norm", "group_norm", "norm_q", "norm_k")
                   if getattr(attn, field, None) is not None]
    if unsupported:
        raise NotImplementedError(f"patch-parallel self-attention does not support {', '.join(unsupported)} "
                                  f"(in {name})")


class PatchSelfAttnProcessor:
    def __init__(self, context: PatchContext, original: Any) -> None:
        self.context = context
        self.original = original

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.context.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if hidden_states.dim() != 3 or encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("patch-parallel self-attention takes (B, tokens, C) hidden states, "
                                      "no encoder states and no mask")
        residual = hidden_states
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if self.context.exchanges:
            inner = key.shape[-1]
            parts = self.context.comm.all_gather(torch.cat([key, value], dim=-1), "attention_kv")
            key, value = torch.cat(parts, dim=1).split(inner, dim=-1)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
