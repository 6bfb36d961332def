"""Skip UNet blocks at chosen timesteps (AutoDiffusion's architecture search space, specs/samplers.md §4.1).

The blocks are the ResNet blocks and the attention (Transformer2D) blocks of a diffusers
``UNet2DConditionModel``, named by their module path (``down_blocks.1.attentions.0``). A skipped
ResNet block returns its skip connection (identity or its 1x1 shortcut convolution, after the
block's own up/down-sampling, over its output scale factor); a skipped attention block is the
identity. Which blocks are skipped depends on the timestep the UNet is called at, read by a
forward pre-hook on the UNet, so the denoising loop itself does not change.

``BlockSkip`` patches the blocks only while it is active (a ``with`` block) and restores them on
exit; with nothing to skip it patches nothing, and a block not skipped at a timestep runs its own
forward: the UNet's output is then bit-identical to the plain UNet's.

Three modes: ``"drop"`` (above: AutoDiffusion's skipped block), ``"reuse"`` (DeepCache-style): a skipped
block returns its own output from the last UNet call where it ran, and ``"residual"``: a skipped block
returns its skip path of this call's input plus the residual (output less skip path) it computed at the
last call where it ran. The cached call must have had the same input shape (the same batch rows);
where there is none (the first call, or another batch size) the block runs instead and is cached.
The cache belongs to one ``with`` block (the engine enters one per generation): emptied on entry and
exit, never shared between generations or requests. ``mode`` may also map each block to its own mode
(the probe in docs/benchmarks.md: residual is best for ResNet blocks, drop for attention).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Collection, Mapping
from types import TracebackType
from typing import Any, Literal

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

SKIPPABLE = (ResnetBlock2D, Transformer2DModel)
SkipMode = Literal["drop", "reuse", "residual"]
SKIP_MODES: tuple[str, ...] = ("drop", "reuse", "residual")


def skippable_blocks(unet: torch.nn.Module) -> list[str]:
    """The UNet's skippable blocks in the order a forward pass runs them (down, mid, up)."""
    names = [name for name, module in unet.named_modules() if isinstance(module, SKIPPABLE)]
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda name: (stage.get(name.split(".")[0], 3), names.index(name)))


def _resnet_shortcut(block: ResnetBlock2D, input_tensor: torch.Tensor) -> torch.Tensor:
    if block.upsample is not None:
        input_tensor = block.upsample(input_tensor)
    elif block.downsample is not None:
        input_tensor = block.downsample(input_tensor)
    if block.conv_shortcut is not None:
        input_tensor = block.conv_shortcut(input_tensor)
    return input_tensor / block.output_scale_factor


class BlockSkip:
    """While active, the UNet skips the blocks ``skips[t]`` when called at timestep ``t``.

    ``skips`` maps a timestep (as the loop passes it to the UNet) to the names of the blocks to skip
    there; timesteps not in it run the whole UNet. ``mode`` says what a skipped block returns: its skip
    connection (``"drop"``), its cached output of the last call where it ran (``"reuse"``), or its skip
    connection plus the residual it added at that call (``"residual"``).
    ``mode`` may be a mapping from block name to mode instead: each block skipped in its own mode (a block
    it leaves out is dropped). ``skipped_calls`` counts the block calls skipped (in reuse mode: served from
    the cache).
    """

    def __init__(self, unet: torch.nn.Module, skips: Mapping[float, Collection[str]],
                 mode: SkipMode | Mapping[str, SkipMode] = "drop") -> None:
        per_block, default = (dict(mode), "drop") if isinstance(mode, Mapping) else ({}, mode)
        for block, value in [(None, default), *per_block.items()]:
            if value not in SKIP_MODES:
                where = "" if block is None else f" (block {block!r})"
                raise ValueError(f"mode must be one of {', '.join(map(repr, SKIP_MODES))}, not {value!r}{where}")
        known = skippable_blocks(unet)
        for t, names in (*skips.items(), ("mode", per_block)):
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise ValueError(f"{'mode' if t == 'mode' else f'timestep {t}'}: no skippable block {unknown[0]!r} "
                                 f"in this UNet (its blocks: {', '.join(known)})")
        self.unet = unet
        self.skips = {float(t): frozenset(names) for t, names in skips.items() if names}
        self.mode = mode
        self._modes: dict[str, str] = per_block
        self._default_mode: str = default
        self.skipped_calls = 0
        # block -> (its last input's shape, that input, its output); in residual mode, once a skip has used it,
        # (shape, None, the residual: output less skip path)
        self._cache: dict[str, tuple[torch.Size, torch.Tensor | None, torch.Tensor]] = {}
        self._now: frozenset[str] = frozenset()
        self._patched: list[torch.nn.Module] = []
        self._hook: Any = None

    def __enter__(self) -> BlockSkip:
        self._cache.clear()
        targets = set().union(*self.skips.values()) if self.skips else set()
        if not targets:
            return self
        modules = dict(self.unet.named_modules())
        for name in sorted(targets):
            module = modules[name]
            module.forward = self._skipping_forward(name, module)  # an instance attribute: removed on exit
            self._patched.append(module)
        self._hook = self.unet.register_forward_pre_hook(self._at_timestep, with_kwargs=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for module in self._patched:
            del module.forward
        self._patched.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._now = frozenset()
        self._cache.clear()

    def _at_timestep(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        value = float(torch.as_tensor(timestep).flatten()[0])
        self._now = self.skips.get(value, frozenset())

    def mode_of(self, name: str) -> str:
        """The mode block ``name`` is skipped in."""
        return self._modes.get(name, self._default_mode)

    def _skipping_forward(self, name: str, module: torch.nn.Module) -> Any:
        original = type(module).forward
        resnet = isinstance(module, ResnetBlock2D)
        mode = self.mode_of(name)
        caching = mode != "drop"

        def skip_path(x: torch.Tensor) -> torch.Tensor:
            """The block with its own computation left out: a ResNet's skip connection, attention's identity."""
            return _resnet_shortcut(module, x) if resnet else x

        def skipped(x: torch.Tensor) -> torch.Tensor | None:
            """The skipped block's output for input ``x``; None where it must run (nothing cached for this shape)."""
            if mode == "drop":
                return skip_path(x)
            entry = self._cache.get(name)
            if entry is None or entry[0] != x.shape:
                return None
            _, before_in, before_out = entry
            if mode == "reuse":
                return before_out
            if before_in is not None:  # the residual of the last run, computed once however often it is reused
                before_out = before_out - skip_path(before_in)
                self._cache[name] = (x.shape, None, before_out)
            return skip_path(x) + before_out  # residual: last run's residual, this input

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if name in self._now and (out := skipped(x)) is not None:
                self.skipped_calls += 1
                if resnet:
                    return out
                return (out,) if not kwargs.get("return_dict", True) else Transformer2DModelOutput(sample=out)
            output = original(module, x, *args, **kwargs)
            if caching:
                self._cache[name] = (x.shape, x, output if resnet else output[0] if isinstance(output, tuple)
                                     else output.sample)
            return output
        return forward


def unet_blocks_of_config(config: Mapping[str, Any]) -> list[str]:
    """The skippable blocks of the ``UNet2DConditionModel`` that ``config`` describes, without its weights (the
    module is built on the meta device: no memory, no time)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    return skippable_blocks(unet)


@functools.lru_cache(maxsize=64)
def model_unet_blocks(location: str, revision: str | None = None) -> tuple[str, ...] | None:
    """The skippable blocks of the UNet of the diffusers model at ``location`` (a directory or a cached hub id),
    from its ``unet/config.json`` only; None where there is no such config to read here."""
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(location, subfolder="unet", revision=revision,
                                                  local_files_only=True)
        return tuple(unet_blocks_of_config(config))
    except (OSError, ValueError, TypeError):
        return None


def measure_block_costs(unet: torch.nn.Module, call: Callable[[], Any], repeats: int = 5) -> dict[str, float]:
    """The cost model of a skip plan: each skippable block's share of one UNet call's wall time, measured.

    ``call`` runs the UNet once (with the batch and latent size the plan will run at); it runs once to warm
    up, then ``repeats`` times with every block timed. The result maps each block to its median share of
    the call's time, and ``""`` to the rest (embeddings, convolutions in and out, resamplers: 1 less the
    blocks' shares), so the shares sum to 1 and a plan's cost is in units of full UNet calls."""
    names = skippable_blocks(unet)
    modules = dict(unet.named_modules())
    spent: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name in names:
        def before(module: torch.nn.Module, args: Any, name: str = name) -> None:
            started[name] = time.perf_counter()

        def after(module: torch.nn.Module, args: Any, output: Any, name: str = name) -> None:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]

        handles += [modules[name].register_forward_pre_hook(before), modules[name].register_forward_hook(after)]
    shares: dict[str, list[float]] = {name: [] for name in names}
    try:
        with torch.no_grad():
            call()
            for _ in range(repeats):
                spent.clear()
                begin = time.perf_counter()
                call()
                total = time.perf_counter() - begin
                for name in names:
                    shares[name].append(spent.get(name, 0.0) / total)
    finally:
        for handle in handles:
            handle.remove()
    medians = {name: statistics.median(values) for name, values in shares.items()}
    return {"": 1.0 - sum(medians.values()), **medians}


def measure_skip_costs(unet: torch.nn.Module, call: Callable[[], Any], repeats: int = 5) -> dict[str, dict[str, float]]:
    """What a skipped block still costs, per mode, as a share of one UNet call's wall time (the other half of
    the cost model: ``measure_block_costs`` gives what running it costs).

    A dropped ResNet block computes its skip connection (its 1x1 shortcut convolution, where it has one, and
    its resampler); a residual-mode skip computes it for this call's input and once for the cached input, plus
    a subtraction and an addition; a reused block and a dropped attention block cost nothing. Each is timed
    on the block's own input and output of one ``call`` (median of ``repeats``), over the call's median time."""
    names = skippable_blocks(unet)
    modules = dict(unet.named_modules())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            seen[name] = (args[0], output if isinstance(output, torch.Tensor)
                          else output[0] if isinstance(output, tuple) else output.sample)
        return record

    handles = [modules[name].register_forward_hook(recorder(name)) for name in names]
    try:
        with torch.no_grad():
            call()
    finally:
        for handle in handles:
            handle.remove()

    def timed(work: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            work()
            times.append(time.perf_counter() - begin)
        return statistics.median(times)

    with torch.no_grad():
        total = timed(call)
        costs: dict[str, dict[str, float]] = {}
        for name in names:
            module, (x, out) = modules[name], seen[name]
            if not isinstance(module, ResnetBlock2D):
                costs[name] = {"drop": 0.0, "reuse": 0.0, "residual": timed(lambda x=x, out=out: x + (out - x)) / total}
                continue
            costs[name] = {"drop": timed(lambda module=module, x=x: _resnet_shortcut(module, x)) / total, "reuse": 0.0,
                           "residual": timed(lambda module=module, x=x, out=out: _resnet_shortcut(module, x) + (
                               out - _resnet_shortcut(module, x))) / total}
    return costs
