"""``MarPipeline``: a saved MAR-style model and its generation entry point.

Directory layout (``accel_diffusion/models/builtin/shapes_mar``)::

    mar_config.json          the pipeline's settings (below) and the base model it reads tokens with
    transformer/             MarTransformer (config.json + diffusion_pytorch_model.safetensors)
    head/                    DiffusionHead  (config.json + diffusion_pytorch_model.safetensors)
    head_scheduler/          the head's noise process (scheduler_config.json, a DDPMScheduler)
    README.md, training_info.json

The tokenizer, text encoder and VAE are the ``shapes`` model's, read from the directory named by
``mar_config.json``'s ``base`` (a built-in model name or a path); their safetensors' SHA-256 are
recorded at training time and checked at load, so a retrained ``shapes`` cannot silently feed this
model latents of another space.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from accel_diffusion.ar.head import DiffusionHead
from accel_diffusion.ar.model import MarTransformer, unpatchify
from accel_diffusion.ar.sampling import ArCost, generate_tokens
from accel_diffusion.engine.conditioning import PromptEncoder
from accel_diffusion.engine.hooks import NO_HOOKS, GenerationHooks
from accel_diffusion.errors import ModelLoadError
from accel_diffusion.guidance.base import Guidance
from accel_diffusion.samplers.base import Sampler

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "models" / "builtin"
BASE_FILES = ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_dir(base: str) -> Path:
    """A built-in model name (``shapes``) or a directory."""
    return BUILTIN_DIR / base if (BUILTIN_DIR / base).is_dir() else Path(base).expanduser()


@dataclass
class ArResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    cost: ArCost


class MarPipeline:
    """Transformer + diffusion head + the base model's tokenizer, text encoder and VAE."""

    def __init__(self, transformer: MarTransformer, head: DiffusionHead, head_scheduler: DDPMScheduler,
                 tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, vae: AutoencoderKL,
                 config: dict[str, Any]) -> None:
        self.transformer = transformer.eval()
        self.head = head.eval()
        self.head_scheduler = head_scheduler
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.vae = vae.eval()
        self.config = config
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.prompt_encoder = PromptEncoder(self, self.device, self.dtype)

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> MarPipeline:
        """Every module on ``device`` in ``dtype``, frozen."""
        for module in (self.transformer, self.head, self.text_encoder, self.vae):
            module.to(device)
            if dtype != torch.float32:  # the weights are float32; a no-op cast only draws diffusers' warning
                module.to(dtype)
            module.eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.prompt_encoder = PromptEncoder(self, self.device, self.dtype)
        return self

    @property
    def head_scheduler_config(self) -> dict[str, Any]:
        return dict(self.head_scheduler.config)

    @classmethod
    def load_base(cls, base: str) -> tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL]:
        path = base_dir(base)
        return (CLIPTokenizer.from_pretrained(path / "tokenizer"),
                CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True),
                AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MarPipeline:
        path = Path(path)
        try:
            config = json.loads((path / "mar_config.json").read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{str(path)!r} has no mar_config.json: not a MAR model directory") from None
        base = base_dir(config["base"])
        for name, digest in config.get("base_sha256", {}).items():
            if not (base / name).is_file() or file_sha256(base / name) != digest:
                raise ModelLoadError(f"{str(path)!r} was trained on the latents of base model {config['base']!r}, but "
                                     f"{str(base / name)!r} differs from the file it was trained with: retrain it "
                                     "(accel-diffusion train shapes_mar)")
        tokenizer, text_encoder, vae = cls.load_base(config["base"])
        return cls(MarTransformer.from_pretrained(path / "transformer", use_safetensors=True),
                   DiffusionHead.from_pretrained(path / "head", use_safetensors=True),
                   DDPMScheduler.from_pretrained(path / "head_scheduler"), tokenizer, text_encoder, vae, config)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(path / "transformer", safe_serialization=True)
        self.head.save_pretrained(path / "head", safe_serialization=True)
        self.head_scheduler.save_pretrained(path / "head_scheduler")
        (path / "mar_config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    @torch.no_grad()
    def text_states(self, prompts: Sequence[str], negative_prompt: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the prompts' text-encoder states (B, L, E), the unconditional prompt's (1, L, E): the negative
        prompt, else the empty prompt the model was trained with for CFG)."""
        cond = torch.cat([self.prompt_encoder.encode_one(p)[0] for p in prompts])
        return cond, self.prompt_encoder.encode_one(negative_prompt or "")[0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        c, size, patch = self.config["latent_channels"], self.config["latent_size"], self.config["patch_size"]
        latents = unpatchify(tokens, patch, c, size, size) / self.vae.config.scaling_factor
        images = self.vae.decode(latents).sample
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        plan: list[int],
        sampler: Sampler,
        make_guidance: Callable[[], Guidance],
        hooks: GenerationHooks = NO_HOOKS,
        negative_prompt: str | None = None,
    ) -> ArResult:
        """One image per prompt, ``len(plan)`` AR iterations, ``plan[k]`` head steps at iteration k."""
        text, empty = self.text_states(prompts, negative_prompt)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        tokens, cost = generate_tokens(self.transformer, self.head, self.head_scheduler_config, text, empty, plan,
                                       sampler, make_guidance, generators, hooks)
        return ArResult(self.decode(tokens), cost)
