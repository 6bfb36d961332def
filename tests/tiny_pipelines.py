"""Tiny random-weight Stable Diffusion (1.x-style and SDXL) pipelines built in code, for tests.

Built offline from configs only (no hub), saved with ``save_pretrained`` so that tests exercise the
real ``from_pretrained`` loading path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from accel_diffusion.models.shapes.tokenizer import build_tokenizer


def _tokenizer() -> CLIPTokenizer:
    return build_tokenizer()


def _scheduler(prediction_type: str = "epsilon") -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, prediction_type=prediction_type,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )


def _text_config(tokenizer: CLIPTokenizer, hidden: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden,
    )


def _unet(cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8, **extra,
    )


def build_tiny_sd(prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    tokenizer = _tokenizer()
    unet = _unet(32)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    tokenizer = _tokenizer()
    unet = _unet(48, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 24, transformer_layers_per_block=1)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 16))
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, 32, projection=24))
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=_tokenizer(), unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    )


def save(pipeline: object, directory: Path) -> Path:
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory
