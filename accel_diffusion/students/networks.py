"""Small networks for students of vector-valued models (the ``gmm`` oracle): generator, fake score, discriminator.

They are diffusers ``ModelMixin``/``ConfigMixin`` classes, so a trained student saves as safetensors with a
``config.json`` and loads with ``from_pretrained`` like any diffusers model. Image students (``shapes``) use
diffusers' own ``UNet2DConditionModel`` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class StudentOutput(BaseOutput):
    """A network's prediction, shaped like its input sample."""

    sample: torch.Tensor


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def timestep_embedding(timestep: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of timesteps in [0, num_train_timesteps) (fractional allowed)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = (timestep.float().reshape(-1, 1) / num_train_timesteps) * 1000.0 * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MlpGenerator(ModelMixin, ConfigMixin):
    """One-step generator ``x0 = G(z)`` for vector data: an MLP from noise z ~ N(0, I) to a sample.

    Called like a denoiser, ``G(sample, timestep)``: the timestep is accepted for call-site compatibility
    (a 1-step student always runs at its fixed ``timestep``) and ignored; the output is the x0 estimate.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, timestep: int = 999) -> None:
        super().__init__()
        self.net = _mlp([dim, *([hidden] * layers), dim])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int | None = None,
                return_dict: bool = True) -> StudentOutput | tuple[torch.Tensor]:
        out = self.net(sample.to(self.net[0].weight.dtype)).to(sample.dtype)
        return StudentOutput(sample=out) if return_dict else (out,)


class MlpDenoiser(ModelMixin, ConfigMixin):
    """x0-prediction ``D(x_t, t)`` for vector data (the fake score of distribution matching), with features.

    ``features(x_t, t)`` is the trunk's last hidden layer: the discriminator of f-distill reads it.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, embed_dim: int = 32,
                 num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.trunk = nn.Sequential(_mlp([dim + embed_dim, *([hidden] * layers)]), nn.SiLU())
        self.head = nn.Linear(hidden, dim)

    @property
    def feature_dim(self) -> int:
        return int(self.config.hidden)

    def features(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timestep.expand(sample.shape[0]) if timestep.numel() == 1 else timestep,
                                 self.config.embed_dim, self.config.num_train_timesteps)
        return self.trunk(torch.cat([sample.float(), emb], dim=1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True,
                ) -> StudentOutput | tuple[torch.Tensor]:
        out = self.head(self.features(sample, torch.as_tensor(timestep, device=sample.device))).to(sample.dtype)
        return StudentOutput(sample=out) if return_dict else (out,)


class DiscriminatorHead(nn.Module):
    """K logit heads on features (B, F) -> (B, K); their mean estimates log(p/q) (``heads`` = K)."""

    def __init__(self, feature_dim: int, hidden: int = 128, heads: int = 1) -> None:
        super().__init__()
        self.net = _mlp([feature_dim, hidden, hidden, heads])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
