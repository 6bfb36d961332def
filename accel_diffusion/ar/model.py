"""The MAR-style bidirectional transformer over latent tokens, conditioned on a prompt.

Inputs: the latent tokens (B, N, token_dim) of an image (the ``shapes`` VAE's 8x8x4 latents in p x p
patches, ``patchify``: the shipped model has p = 1 as MAR on its latents, N = 64 tokens of 4 values; the
first models had p = 2, 16 tokens of 16), a mask (B, N), True where a token is still
unknown, and the prompt's text-encoder states (B, L, text_dim). Unknown tokens are replaced by a
learned mask embedding; text states (projected) and tokens (plus position embeddings) form one
sequence for a pre-norm transformer encoder with full (bidirectional) attention. The output is one
vector z per token position, the condition of the diffusion head that samples that token.

Unlike MAR, which runs its encoder on the known tokens only and a decoder on all, one encoder sees
every position (MaskGIT-style): at 64 tokens the saving is not worth a second stack.

``pos_init_std``: the position embeddings' initial scale. ViT's 0.02 (the first shipped model) leaves a
visible token's position at ~5% of its embedding's norm (0.3 against 7 after 1,400 steps): that model
learned p(token | prompt, position) and ignored the known tokens (``ar/train.py: context_use``: its x0
estimate's error on the masked tokens was 0.235 with 8 of 16 tokens known, 0.237 with none), so every token
was drawn independently and the shapes came out incoherent (shape accuracy at chance). At 0.5 a position
weighs about as much as the token's content.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class MarTransformer(ModelMixin, ConfigMixin):
    """(tokens (B, N, D), mask (B, N) bool, text (B, L, E)) -> z (B, N, width)."""

    @register_to_config
    def __init__(
        self,
        token_dim: int = 16,
        num_tokens: int = 16,
        text_dim: int = 128,
        text_len: int = 16,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        pos_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.token_proj = nn.Linear(token_dim, width)
        self.mask_embedding = nn.Parameter(torch.zeros(width))
        self.token_pos = nn.Parameter(torch.randn(num_tokens, width) * pos_init_std)
        self.text_proj = nn.Linear(text_dim, width)
        self.text_pos = nn.Parameter(torch.randn(text_len, width) * pos_init_std)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.token_proj(tokens)
        h = torch.where(mask[..., None], self.mask_embedding.to(h.dtype).expand_as(h), h) + self.token_pos
        t = self.text_proj(text) + self.text_pos[: text.shape[1]]
        out = self.encoder(torch.cat([t, h], dim=1))
        return self.norm(out[:, text.shape[1]:])


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, (H/p)(W/p), C p p) tokens: p x p patches, row-major."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of ``patchify``: (B, N, C p p) tokens -> (B, C, H, W) latents."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, height, width)
