"""StreamDiffusion's stream batch (§5.1) with RCFG (§5.2): one UNet call per frame.

A session is prepared once and then called per frame. With ``t_index_list`` = [τ_0 < … < τ_{n-1}]
(indices into a 50-step trailing grid of the model's training timesteps; larger = less noise) the
UNet batch holds one slot per step, each a different frame:

- slot 0: the newest frame's latent noised to τ_0 with the fixed noise ``init_noise[0]``;
- slot i > 0: an earlier frame, noised to τ_i from its previous estimate with ``init_noise[i]``.

One call predicts every slot's noise; x̂0_i = (x_i − σ_i ε_i) / α_i. The last slot's x̂0 is the
output (so a frame leaves n − 1 calls after it entered; the first n − 1 calls return None), the
others move one slot on: x_{i+1} = α_{i+1} x̂0_i + σ_{i+1} init_noise[i+1]. This equals denoising
each frame on its own through the same steps with the same noise (tests/stream/test_session.py).

Guidance (ε-space; γ = ``guidance_scale``, δ = ``delta``):

- ``none``: ε = ε_c (n evaluations per frame);
- ``cfg``: ε = ε_u + γ (ε_c − ε_u) (2n);
- ``rcfg_self``: ε = δ ε̄ + γ (ε_c − δ ε̄) with the virtual residual noise ε̄_i = (x_i − α_i X) / σ_i
  of the slot's own frame latent X (n evaluations);
- ``rcfg_onetime``: the same with X = the clean latent implied by one real negative-prompt
  evaluation of slot 0 when its frame enters (n + 1).

Acceleration (``acceleration``, the engine's word: engine/compiled.py): ``compile`` runs the UNet, the
decode and the frame's encode as static-shape graphs per row bucket (``LoadedPipeline.compiled_model``, shared with the
model's requests, jobs and other sessions), StreamDiffusion's fixed-batch TensorRT engines in spirit.
When the session is made (and when ``update`` changes the number of steps) a graph its UNet batch
lacks is built in the background while frames run eagerly; ``wait_for_graphs`` waits for it.

Autoencoder (``vae``): ``full`` encodes and decodes frames with the pipeline's VAE; ``tiny`` with the
model's TAESD-style ``AutoencoderTiny`` of the same latent space (the registry entry's ``tiny_vae``),
as StreamDiffusion does with TAESD; ``auto`` (the default) takes the tiny one when the model has it.

This is the diffusion-model form of the boundary step (c_skip = 0, c_out = 1), so it runs any
ε- or v-prediction model; LCM-distilled UNets (guidance embeddings) are refused by the engine.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from accel_diffusion.engine.engine import _decode, _image_to_tensor, _model_latents, _vae_encode
from accel_diffusion.engine.loop import call_model
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.guidance.base import COND, UNCOND
from accel_diffusion.models.loading import LoadedPipeline
from accel_diffusion.schedulers.noise_grid import train_alphas_cumprod
from accel_diffusion.strategy import DEFAULT_LIMITS, MAX_SEED, RequestLimits
from accel_diffusion.stream.similarity_filter import SimilarityFilter
from accel_diffusion.text import check_text

StreamGuidance = Literal["none", "cfg", "rcfg_self", "rcfg_onetime"]
StreamVae = Literal["auto", "full", "tiny"]
StreamAcceleration = Literal["none", "compile"]
GRID_STEPS = 50
# StreamDiffusion's README defaults: img2img keeps part of the frame, txt2img starts from pure noise (index 0)
Steps = tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]  # t_index_list, timesteps, α, σ
DEFAULT_T_INDEX_LIST = {"img2img": (32, 45), "txt2img": (0, 16, 32, 45)}


def _number(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    """A finite real in [low, high] (not a bool or a string), else InvalidRequestError on ``name``."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or not low <= value <= high):
        bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise InvalidRequestError(name, f"must be a number {bounds}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def _text(name: str, value: Any, limits: RequestLimits, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value) or len(value) > limits.max_prompt_chars:
        raise InvalidRequestError(name, f"must be a {'non-empty ' if required else ''}string of at most "
                                  f"{limits.max_prompt_chars} characters")
    return check_text(name, value)  # a lone surrogate would fail in the tokenizer


def strength_t_index_list(strength: float, steps: int) -> list[int]:
    """diffusers' img2img ``strength`` as a ``t_index_list`` of ``steps`` indices on the 50-step grid.

    The first index is where diffusers' img2img with 50 steps starts, 50 − int(50 · strength) (the
    noise level of the first step); the ``steps`` indices spread evenly over the rest of the grid, so
    ``steps`` = int(50 · strength) gives exactly diffusers' img2img timesteps."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise InvalidRequestError("strength", f"must be a number in (0, 1], got {strength!r}")
    span = min(int(GRID_STEPS * strength), GRID_STEPS)
    if span < steps:
        raise InvalidRequestError("strength", f"strength {strength} leaves {span} of the {GRID_STEPS} grid steps, "
                                  f"fewer than the session's {steps}")
    first = GRID_STEPS - span
    return [first + (k * span) // steps for k in range(steps)]


def _check_student(model: LoadedPipeline, guidance: str, mode: str, slots: int) -> None:
    """A distilled student (its entry names a ``student`` component) refuses what it cannot stream."""
    student = model.spec.default_strategy.student
    if student is not None:
        from accel_diffusion.registry import get_registry

        get_registry().build("student", student).check_stream(guidance, mode, slots)


@dataclass
class FrameStats:
    """What one call did: UNet evaluations (per image), UNet calls, whether the filter skipped it."""

    nfe: int = 0
    unet_calls: int = 0
    skipped: bool = False
    warming_up: bool = False


@dataclass
class StreamState:
    """Per-session tensors: never shared between sessions."""

    latents: torch.Tensor | None = None  # (n - 1, C, h, w): slots 1..n-1, already noised
    references: torch.Tensor | None = None  # (n - 1, C, h, w): each buffered slot's RCFG clean latent X
    calls: int = 0
    last_output: np.ndarray | None = None
    last_estimate: torch.Tensor | None = None  # the output frame's clean latent x̂0, before decoding
    last_frame: FrameStats | None = None  # what the latest call did
    # running totals over the session (a list per frame would grow for as long as the stream runs)
    frames: int = 0
    skipped: int = 0
    nfe: int = 0
    unet_calls: int = 0


class StreamSession:
    """``session(frame) -> frame | None`` (img2img) or ``session() -> frame | None`` (txt2img)."""

    def __init__(self, model: LoadedPipeline, prompt: str, *, negative_prompt: str | None = None,
                 t_index_list: Sequence[int] | None = None, guidance: StreamGuidance = "rcfg_self",
                 guidance_scale: float = 1.2, delta: float = 1.0, seed: int = 0, width: int | None = None,
                 height: int | None = None, mode: Literal["img2img", "txt2img"] = "img2img",
                 similarity_threshold: float | None = None, max_skip: int = 10, vae: StreamVae = "auto",
                 strength: float | None = None, acceleration: StreamAcceleration = "none",
                 limits: RequestLimits = DEFAULT_LIMITS) -> None:
        """``t_index_list`` defaults to StreamDiffusion's [32, 45] for img2img and [0, 16, 32, 45] for
        txt2img; ``limits`` bounds the frame size and prompt length as for generation requests."""
        if model.family != "sd":
            raise InvalidRequestError("model", f"stream sessions run Stable Diffusion 1.x/2.x models, "
                                      f"not {model.family!r}")
        if model.pipeline.unet.config.time_cond_proj_dim is not None:
            raise InvalidRequestError("model", "guidance-embedding (LCM-distilled) UNets are not supported yet")
        if mode not in ("img2img", "txt2img"):
            raise InvalidRequestError("mode", f"unknown stream mode {mode!r}", ["img2img", "txt2img"])
        if guidance not in ("none", "cfg", "rcfg_self", "rcfg_onetime"):
            raise InvalidRequestError("guidance", f"unknown stream guidance {guidance!r}",
                                      ["none", "cfg", "rcfg_self", "rcfg_onetime"])
        if mode == "txt2img" and guidance.startswith("rcfg"):
            raise InvalidRequestError("guidance", "txt2img streams have no input latent for RCFG; use none or cfg")
        if vae not in ("auto", "full", "tiny"):
            raise InvalidRequestError("vae", f"unknown vae {vae!r}", ["auto", "full", "tiny"])
        if vae == "tiny" and model.tiny_vae is None:
            raise InvalidRequestError("vae", f"model {model.model_id!r} declares no tiny autoencoder (tiny_vae)",
                                      ["auto", "full"])
        if acceleration not in ("none", "compile"):
            raise InvalidRequestError("acceleration", f"unknown acceleration {acceleration!r}", ["none", "compile"])
        self.model = model
        self.limits = limits
        self.acceleration = acceleration
        self._unet = model.compiled_model().unet if acceleration == "compile" else model.pipeline.unet
        self.vae = "tiny" if vae == "tiny" or (vae == "auto" and model.tiny_vae is not None) else "full"
        self._vae = model.tiny_vae if self.vae == "tiny" else model.pipeline.vae
        self._decoder = model.compiled_model().decoder(self._vae) if acceleration == "compile" else None
        self._encoder = model.compiled_model().encoder(self._vae) if acceleration == "compile" else None
        self.mode = mode
        self.guidance = guidance
        self.guidance_scale = _number("guidance_scale", guidance_scale)
        self.delta = _number("delta", delta)
        default_w, default_h = model.default_size
        factor = model.vae_scale_factor
        self.width = _integer("width", default_w if width is None else width, factor, limits.max_width)
        self.height = _integer("height", default_h if height is None else height, factor, limits.max_height)
        if self.width % factor or self.height % factor:
            raise InvalidRequestError("width", f"width and height must be multiples of {factor}")
        if self.width * self.height > limits.max_pixels:
            raise InvalidRequestError("width", f"{self.width}x{self.height} is more than {limits.max_pixels} pixels")
        config = model.scheduler_config
        self.prediction_type = config.get("prediction_type", "epsilon")
        self._alphas_cumprod = torch.as_tensor(train_alphas_cumprod(
            config.get("num_train_timesteps", 1000), config.get("beta_start", 0.0001),
            config.get("beta_end", 0.02), config.get("beta_schedule", "linear"), config.get("trained_betas"),
        ), dtype=torch.float64)
        seed = _integer("seed", seed, 0, MAX_SEED)
        if similarity_threshold is None:
            self.filter = None
        else:
            self.filter = SimilarityFilter(_number("similarity_threshold", similarity_threshold, 0.0, 1.0),
                                           _integer("max_skip", max_skip, 0, 10_000), seed)
        self.state = StreamState()
        steps = self._steps(DEFAULT_T_INDEX_LIST[mode] if t_index_list is None else t_index_list)
        if strength is not None:  # t_index_list then gives only the number of steps
            steps = self._strength_steps(strength, len(steps[0]))
        _check_student(model, guidance, mode, len(steps[0]))
        self._prompt = _text("prompt", prompt, limits, required=True)
        self._negative = _text("negative_prompt", negative_prompt, limits, required=False)
        self._cond, self._uncond = self._prompt_states(self._prompt, self._negative)
        self._use_steps(steps)
        self.seed = seed
        self.init_noise = self._noise(seed, self.num_slots)
        self._build_graph()

    # -- preparation (once, and on update): each helper validates and builds, nothing is stored until all succeed --

    def _steps(self, t_index_list: Any) -> Steps:
        """(indices, timesteps, α, σ) of a ``t_index_list``."""
        sequence = isinstance(t_index_list, Sequence) and not isinstance(t_index_list, str | bytes)
        indices = [int(i) for i in t_index_list] if sequence and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in t_index_list) else []
        if not indices or indices != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= GRID_STEPS:
            raise InvalidRequestError("t_index_list", f"must be increasing integer indices in [0, {GRID_STEPS}), "
                                      f"got {t_index_list!r}")
        train = len(self._alphas_cumprod)
        grid = [round(train - k * train / GRID_STEPS) - 1 for k in range(GRID_STEPS)]  # trailing: 999 … 19
        timesteps = torch.tensor([grid[i] for i in indices], device=self.model.device)
        abar = self._alphas_cumprod[timesteps.cpu()]
        shape = (len(indices), 1, 1, 1)
        alpha = abar.sqrt().to(self.model.device, self.model.dtype).view(shape)
        sigma = (1 - abar).sqrt().to(self.model.device, self.model.dtype).view(shape)
        return indices, timesteps, alpha, sigma

    def _strength_steps(self, strength: float, count: int) -> Steps:
        """The steps of diffusers' img2img ``strength``: ``count`` indices (``strength_t_index_list``)."""
        if self.mode == "txt2img":
            raise InvalidRequestError("strength", "txt2img streams start from pure noise; strength is for img2img")
        return self._steps(strength_t_index_list(strength, count))

    def _use_steps(self, steps: Steps) -> None:
        self.t_index_list, self.timesteps, self._alpha, self._sigma = steps
        self._restart()

    def _restart(self) -> None:
        """A new pipeline of slots (new steps or noise): the session warms up again."""
        self.state.latents = self.state.references = None
        self.state.calls = 0

    def _noise(self, seed: int, slots: int) -> torch.Tensor:
        unet = self.model.pipeline.unet
        shape = (slots, unet.config.in_channels, self.height // self.model.vae_scale_factor,
                 self.width // self.model.vae_scale_factor)
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator).to(self.model.device, self.model.dtype)

    def _prompt_states(self, prompt: str, negative_prompt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.model.prompt_encoder
        assert encoder is not None
        conditioning = encoder.conditioning([prompt], negative_prompt, True)
        return (conditioning.branches[COND]["encoder_hidden_states"],
                conditioning.branches[UNCOND]["encoder_hidden_states"])

    def update(self, *, prompt: str | None = None, negative_prompt: str | None = None,
               t_index_list: Sequence[int] | None = None, seed: int | None = None,
               guidance_scale: float | None = None, delta: float | None = None,
               strength: float | None = None) -> None:
        """Change parameters mid-stream. Prompt, scale and delta apply from the next frame on with the
        buffered frames kept; new steps (``t_index_list``, or ``strength`` with the current number of
        steps) or a new seed restart the slots (and their warm-up). All or nothing: an invalid value
        raises InvalidRequestError and leaves the session as it was."""
        if strength is not None and t_index_list is not None:
            raise InvalidRequestError("strength", "give strength or t_index_list, not both")
        scale = self.guidance_scale if guidance_scale is None else _number("guidance_scale", guidance_scale)
        new_delta = self.delta if delta is None else _number("delta", delta)
        new_seed = self.seed if seed is None else _integer("seed", seed, 0, MAX_SEED)
        steps = None
        if strength is not None:
            steps = self._strength_steps(strength, self.num_slots)
        elif t_index_list is not None:
            steps = self._steps(t_index_list)
        texts = None
        if prompt is not None or negative_prompt is not None:
            texts = (_text("prompt", prompt, self.limits, required=True) if prompt is not None else self._prompt,
                     _text("negative_prompt", negative_prompt, self.limits, required=False)
                     if negative_prompt is not None else self._negative)
        states = None if texts is None else self._prompt_states(*texts)
        noise = None
        if steps is not None or seed is not None:
            noise = self._noise(new_seed, len(steps[0]) if steps is not None else self.num_slots)
        # everything is valid and built: commit
        self.guidance_scale, self.delta, self.seed = scale, new_delta, new_seed
        if texts is not None and states is not None:
            (self._prompt, self._negative), (self._cond, self._uncond) = texts, states
        rows_before = self._unet_rows
        if steps is not None:
            self._use_steps(steps)
        if noise is not None:
            self.init_noise = noise
            self._restart()
        if self._unet_rows != rows_before:
            self._build_graph()
        if self.filter is not None:  # the next frame shows the new parameters, however still the scene
            self.filter.reset()

    @property
    def num_slots(self) -> int:
        return len(self.t_index_list)

    @property
    def _unet_rows(self) -> int:
        """Rows of the session's one UNet call per frame: n, 2n with CFG, n + 1 with RCFG onetime."""
        n = self.num_slots
        return {"cfg": 2 * n, "rcfg_onetime": n + 1}.get(self.guidance, n)

    @torch.no_grad()
    def _build_graph(self) -> None:
        """With ``acceleration="compile"``: one call through the per-frame path on zero latents, so that
        the graphs of this batch (UNet, decode) are built in the background now rather than on the first
        frames. Touches no state."""
        if self.acceleration == "none":
            return
        x = torch.zeros_like(self.init_noise)
        self._guided_noise(x, None if self.mode == "txt2img" else torch.zeros_like(x), FrameStats())
        _decode(self.model, x[-1:], self._vae, self._decoder)
        if self.mode == "img2img":  # a frame's encode too (one row)
            self._encode(torch.zeros(1, 3, self.height, self.width, device=self.model.device))

    def wait_for_graphs(self, timeout: float | None = None) -> bool:
        """Block until the graphs asked for so far are built (startup, tests); False on timeout."""
        from accel_diffusion.engine.compiled import BUILDER

        return BUILDER.wait(timeout)

    # -- per frame --

    @torch.no_grad()
    def __call__(self, frame: Image.Image | np.ndarray | None = None) -> np.ndarray | None:
        """One frame in, the frame that leaves the pipeline out (uint8 HxWx3), or None while warming up.

        A frame the similarity filter skips costs no UNet call and returns the last output."""
        stats = FrameStats()
        if self.mode == "img2img":
            if frame is None:
                raise InvalidRequestError("frame", "an img2img stream needs a frame per call")
            pixels = self._frame_tensor(frame)
            warming_up = self.state.calls < self.num_slots - 1  # every warm-up call fills a slot: never skip one
            if self.filter is not None and not warming_up and self.filter.should_skip(pixels):
                stats.skipped = True
                self._count(stats)
                return self.state.last_output
            clean = self._encode(pixels)
            newest = self._alpha[:1] * clean + self._sigma[:1] * self.init_noise[:1]
        else:
            clean = None
            newest = self.init_noise[:1]
        x, references = self._slots(newest, clean)
        eps, references = self._guided_noise(x, references, stats)
        estimates = (x - self._sigma * eps) / self._alpha
        self._advance(estimates, references)
        self.state.calls += 1
        self._count(stats)
        if self.state.calls < self.num_slots:
            stats.warming_up = True
            return None
        self.state.last_estimate = estimates[-1:]
        image = _decode(self.model, estimates[-1:], self._vae, self._decoder)[0]
        self.state.last_output = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        return self.state.last_output

    def _frame_tensor(self, frame: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise InvalidRequestError("frame", f"must be uint8 HxWx3, got {frame.dtype} {frame.shape}")
            frame = Image.fromarray(frame)
        return _image_to_tensor(frame.convert("RGB"), self.width, self.height).to(self.model.device)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._encoder is not None:  # the compiled encode: the same latents as _vae_encode's without generators
            return _model_latents(self._vae, self._encoder(pixels.to(self._vae.dtype))).to(self.model.dtype)
        return _vae_encode(self._vae, pixels).to(self.model.dtype)  # deterministic per frame

    def _slots(self, newest: torch.Tensor, clean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet batch (slot 0 = the newest frame) and each slot's RCFG reference latent."""
        state = self.state
        if state.latents is None:  # before the first frame: zero slots (their outputs are never shown)
            rest = torch.zeros_like(self.init_noise[1:])
            state.latents, state.references = rest, torch.zeros_like(rest)
        x = torch.cat([newest, state.latents])
        references = None if clean is None else torch.cat([clean, state.references])
        return x, references

    def _eps(self, x: torch.Tensor, slots: list[int], states: torch.Tensor) -> torch.Tensor:
        """The model's noise prediction for rows ``x``; row k sits at slot ``slots[k]`` (its timestep)."""
        output = call_model(self._unet, x, self.timesteps[slots], encoder_hidden_states=states)
        if self.prediction_type == "v_prediction":  # ε = α v + σ x
            return self._alpha[slots] * output + self._sigma[slots] * x
        return output

    def _guided_noise(self, x: torch.Tensor, references: torch.Tensor | None,
                      stats: FrameStats) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.num_slots
        slots = list(range(n))
        cond = self._cond.expand(n, -1, -1)
        if self.guidance == "cfg":
            both = self._eps(torch.cat([x, x]), slots + slots, torch.cat([self._uncond.expand(n, -1, -1), cond]))
            uncond, eps_c = both.chunk(2)
            stats.nfe, stats.unet_calls = 2 * n, 1
            return uncond + self.guidance_scale * (eps_c - uncond), references
        if self.guidance == "rcfg_onetime":
            assert references is not None
            # one real negative evaluation, of slot 0 only, in the same UNet call
            out = self._eps(torch.cat([x[:1], x]), [0, *slots], torch.cat([self._uncond, cond]))
            eps_neg, eps_c = out[:1], out[1:]
            references = references.clone()
            references[:1] = (x[:1] - self._sigma[:1] * eps_neg) / self._alpha[:1]
            stats.nfe, stats.unet_calls = n + 1, 1
        else:
            eps_c = self._eps(x, slots, cond)
            stats.nfe, stats.unet_calls = n, 1
            if self.guidance == "none":
                return eps_c, references
        assert references is not None
        residual = self.delta * (x - self._alpha * references) / self._sigma
        return residual + self.guidance_scale * (eps_c - residual), references

    def _advance(self, estimates: torch.Tensor, references: torch.Tensor | None) -> None:
        """Every slot but the last moves one step on, re-noised with its slot's fixed noise."""
        if self.num_slots == 1:
            return
        self.state.latents = self._alpha[1:] * estimates[:-1] + self._sigma[1:] * self.init_noise[1:]
        if references is not None:
            self.state.references = references[:-1]

    def _count(self, stats: FrameStats) -> None:
        state = self.state
        state.last_frame = stats
        state.frames += 1
        state.skipped += stats.skipped
        state.nfe += stats.nfe
        state.unet_calls += stats.unet_calls

    def stats(self) -> dict[str, Any]:
        state = self.state
        processed = state.frames - state.skipped
        return {"frames": state.frames, "skipped": state.skipped, "nfe": state.nfe, "unet_calls": state.unet_calls,
                "nfe_per_processed_frame": state.nfe / processed if processed else 0.0}
