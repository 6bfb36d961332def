"""Text conditioning for Stable-Diffusion-family pipelines (SD 1.x/2.x and SDXL), with a prompt cache.

Prompts are encoded one at a time and cached, so an image's conditioning never depends on which
other prompts share its batch (a batch equals single calls), and repeated prompts cost nothing.
The encodings follow diffusers' ``encode_prompt`` of the corresponding pipelines exactly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from accel_diffusion.guidance.base import COND, UNCOND

SDXL_ZERO_NEGATIVE = ("sdxl-zero-negative",)  # cache key of SDXL's all-zero negative (never a prompt string)
CacheKey = str | tuple[str]


@dataclass
class Conditioning:
    """Per-branch model keyword arguments, each tensor with one row per image."""

    branches: dict[str, dict[str, object]]
    _stacked: dict[tuple[str, ...], dict[str, object]] = field(default_factory=dict)

    def model_kwargs(self, branches: tuple[str, ...]) -> dict[str, object]:
        """Keyword arguments for a model call over ``branches`` stacked along the batch, in order."""
        if branches not in self._stacked:
            self._stacked[branches] = _stack([self.branches[b] for b in branches])
        return self._stacked[branches]


def _stack(parts: list[dict[str, object]]) -> dict[str, object]:
    if len(parts) == 1:
        return parts[0]
    out: dict[str, object] = {}
    for key, value in parts[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])  # type: ignore[misc]
        elif isinstance(value, dict):
            out[key] = _stack([p[key] for p in parts])  # type: ignore[misc]
        else:
            out[key] = value
    return out


class PromptEncoder:
    """Encodes prompts with a pipeline's tokenizer(s) and text encoder(s); LRU-caches per prompt."""

    def __init__(self, pipeline: object, device: torch.device, dtype: torch.dtype, cache_size: int = 512) -> None:
        self.tokenizer = pipeline.tokenizer
        self.text_encoder = pipeline.text_encoder
        self.tokenizer_2 = getattr(pipeline, "tokenizer_2", None)
        self.text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
        self.is_sdxl = self.text_encoder_2 is not None
        config = getattr(pipeline, "config", None) or {}
        self.force_zeros_for_empty_prompt = bool(config.get("force_zeros_for_empty_prompt", False))
        self.device = device
        self.dtype = dtype
        self._cache: OrderedDict[CacheKey, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every cached prompt encoding."""
        with self._lock:
            self._cache.clear()

    @torch.no_grad()
    def encode_one(self, text: CacheKey) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (1, L, D), pooled embedding (1, P) for SDXL else None) for one prompt."""
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        encoded = self._encode_sdxl(text) if self.is_sdxl else (self._encode_sd(text), None)
        with self._lock:
            self._cache[text] = encoded
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return encoded

    def _token_ids(self, tokenizer: object, text: str) -> torch.Tensor:
        return tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )

    def _encode_sd(self, text: str) -> torch.Tensor:
        inputs = self._token_ids(self.tokenizer, text)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(self.device)
        hidden = self.text_encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(dtype=self.dtype, device=self.device)

    def _encode_sdxl(self, text: CacheKey) -> tuple[torch.Tensor, torch.Tensor]:
        if text == SDXL_ZERO_NEGATIVE:
            hidden, pooled = self._encode_sdxl("")
            return torch.zeros_like(hidden), torch.zeros_like(pooled)
        hidden_states = []
        pooled = None
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        for tokenizer, encoder in pairs:
            if tokenizer is None or encoder is None:
                continue
            inputs = self._token_ids(tokenizer, text)
            out = encoder(inputs.input_ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden_states.append(out.hidden_states[-2])
        hidden = torch.cat(hidden_states, dim=-1).to(dtype=self.dtype, device=self.device)
        return hidden, pooled.to(dtype=self.dtype, device=self.device)

    def negative_key(self, negative_prompt: str | None) -> CacheKey:
        if self.is_sdxl and negative_prompt is None and self.force_zeros_for_empty_prompt:
            return SDXL_ZERO_NEGATIVE
        return negative_prompt or ""

    def conditioning(
        self,
        prompts: Sequence[str],
        negative_prompt: str | None,
        with_uncond: bool,
        sdxl_time_ids: torch.Tensor | None = None,
    ) -> Conditioning:
        """Conditioning with one row per image: ``prompts`` lists each image's prompt."""
        branches = {COND: self._branch([self.encode_one(p) for p in prompts], sdxl_time_ids)}
        if with_uncond:
            neg = self.encode_one(self.negative_key(negative_prompt))
            branches[UNCOND] = self._branch([neg] * len(prompts), sdxl_time_ids)
        return Conditioning(branches)

    def _branch(
        self, encoded: list[tuple[torch.Tensor, torch.Tensor | None]], time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        kwargs: dict[str, object] = {"encoder_hidden_states": torch.cat([e[0] for e in encoded])}
        if self.is_sdxl:
            pooled = torch.cat([e[1] for e in encoded])  # type: ignore[misc]
            assert time_ids is not None, "SDXL needs its added time ids"
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": time_ids.to(self.device, self.dtype).repeat(len(encoded), 1),
            }
        return kwargs
