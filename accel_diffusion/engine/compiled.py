"""``engine_acceleration = "compile"``: a model's UNet and autoencoder decode as compiled graphs.

One ``CompiledModel`` per loaded model (``LoadedPipeline.compiled_model``), shared by every request, job,
batch and stream session of that model. Each compiled callable (``CompiledCall``) runs
``torch.compile(dynamic=False, fullgraph=True)`` graphs with static shapes: the rows of a call are
padded up to the next configured bucket (the last row repeated; the padded rows' outputs discarded), so
a model has one graph per (bucket, latent size), as TensorRT has one engine per profile. Timesteps enter
as a float32 tensor of one value per row, never a Python number (a float would recompile per value).

No request waits for a compile. ``CompiledModel.warm`` builds the given shapes now (the server calls it
at startup, before readiness); a call whose shape has no graph yet runs eagerly and asks the model's
builder thread to build that graph off the request path; later calls of the shape use the graph. One
builder thread per process compiles one graph at a time (PT2 compiles are not thread-safe), with
dynamo's recompile limit raised on that thread (its config is thread-local since torch 2.12).

On CUDA (``cuda_graphs=True``) the graphs are compiled with ``mode="reduce-overhead"`` (CUDA graphs;
each replay overwrites its outputs, so outputs are cloned, and every call marks a new step). CUDA
graphs assert when used from several threads, so there only ``warm`` builds graphs (on the device
worker's thread) and an unforeseen shape runs eagerly for good.

Batch-invariant mode (engine/batch_invariance.py) keeps its promise: under it a call runs unit by unit
(one image and its guidance branches at a time) through the graph of the unit's bucket, the very call
the image gets alone, so its bits do not depend on the batch; the batch is then not one graph call.

Inductor writes its compiled kernels to ``TORCHINDUCTOR_CACHE_DIR`` (``set_cache_dir``): a directory
kept across restarts makes the next start warm (graphs load from the cache instead of compiling).

The server's default (``engine_acceleration`` unset) is ``default_acceleration`` of its models' devices:
``compile`` where compiled graphs measured faster than eager (``COMPILE_PAYS_ON``: CPU, measured 1.35x
diffusers at batch 1 with CFG, docs/benchmarks.md; CUDA, the same graphs replayed as CUDA graphs), ``none``
elsewhere (MPS: inductor's MPS backend is not measured here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from accel_diffusion.engine import batch_invariance

logger = logging.getLogger(__name__)

EngineAcceleration = Literal["none", "compile"]
ACCELERATIONS: tuple[str, ...] = ("none", "compile")
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8)
COMPILE_PAYS_ON: tuple[str, ...] = ("cpu", "cuda")  # device types where the compiled engine measured faster
RECOMPILE_LIMIT = 64  # graphs per compiled code object: buckets x latent sizes (dynamo's default is 8)
_BUILD_LOCK = threading.Lock()  # one compile at a time in the process


def check_acceleration(value: str, field_name: str = "engine_acceleration") -> EngineAcceleration:
    """``value`` if it is an acceleration word, else InvalidRequestError naming ``field_name``."""
    from accel_diffusion.errors import InvalidRequestError

    if value not in ACCELERATIONS:
        raise InvalidRequestError(field_name, f"unknown acceleration {value!r}", list(ACCELERATIONS))
    return value  # type: ignore[return-value]


def default_acceleration(device_types: Sequence[str]) -> EngineAcceleration:
    """``compile`` when every one of ``device_types`` ("cpu", "cuda", "mps", ...) is one where the compiled
    engine measured faster than eager (``COMPILE_PAYS_ON``), else ``none`` (also for no devices)."""
    pays = bool(device_types) and all(kind in COMPILE_PAYS_ON for kind in device_types)
    return "compile" if pays else "none"


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct positive row counts, else ValueError saying what to send."""
    values = tuple(sorted(set(int(b) for b in buckets)))
    if not values or values[0] < 1:
        raise ValueError(f"compile buckets must be positive row counts, e.g. [1, 2, 4, 8]; got {list(buckets)}")
    return values


def set_cache_dir(path: str | os.PathLike[str] | None) -> None:
    """Keep inductor's compiled kernels (and Triton's) in ``path``: graphs built once load from there in
    a later process (a warm start). Call it before the first compile of the process."""
    if path is None:
        return
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.fspath(path)


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket with room for ``rows``; None when ``rows`` is over the largest."""
    return next((b for b in buckets if b >= rows), None)


def _pad(value: Any, rows: int, bucket: int) -> Any:
    """Every tensor with ``rows`` leading rows (nested in dicts too) padded to ``bucket`` rows by
    repeating its last row; every tensor contiguous (a graph is specialised on strides too)."""
    if isinstance(value, dict):
        return {k: _pad(v, rows, bucket) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows and bucket > rows:
        return torch.cat([value, value[-1:].expand(bucket - rows, *value.shape[1:])])
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    return value


def _rows(value: Any, start: int, stop: int, rows: int) -> Any:
    if isinstance(value, dict):
        return {k: _rows(v, start, stop, rows) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_rows(v, start, stop, rows) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
        return value[start:stop]
    return value


def _key(value: Any) -> Any:
    """What a graph is specialised on: tensor shapes (rows padded), dtypes, devices; other values as is."""
    if isinstance(value, dict):
        return tuple((k, _key(v)) for k, v in sorted(value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, list | tuple):
        return tuple(_key(v) for v in value)
    return value


_BUILD_NOW = threading.local()


@contextlib.contextmanager
def build_missing_now() -> Iterator[None]:
    """On this thread, within the block: a call whose shape has no graph yet builds it now, on this thread,
    and runs it compiled (CUDA graphs included), instead of running eagerly while it is built in the
    background. For measurements that must never time a cold compile or an eager stand-in (``bench pareto
    --engine-acceleration compile`` warms each measured shape with it); rows over the largest bucket stay eager."""
    previous = getattr(_BUILD_NOW, "active", False)
    _BUILD_NOW.active = True
    try:
        yield
    finally:
        _BUILD_NOW.active = previous


class GraphBuilder:
    """The process's one background compile thread: builds queued graphs one at a time."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._outstanding += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="graph-builder", daemon=True)
                self._thread.start()
        self._queue.put(job)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted graph is built (tests, benchmarks); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:  # a failed build leaves its shape eager; the request path never sees it
                logger.exception("background graph build failed; that shape keeps running eagerly")
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()


BUILDER = GraphBuilder()


@dataclass
class CallStats:
    compiled_calls: int = 0
    eager_calls: int = 0
    builds: list[dict[str, Any]] = field(default_factory=list)  # {"key", "rows", "seconds", "background"}


class CompiledCall:
    """``fn(*args, **kwargs)`` (tensors with a leading batch of rows) through static-shape graphs, one per
    row bucket and input shape; ``timestep_arg`` names the positional argument made a float32 row tensor."""

    def __init__(self, name: str, fn: Callable[..., Any], buckets: Sequence[int], *, cuda_graphs: bool,
                 timestep_arg: int | None = None, background: bool = True) -> None:
        self.name = name
        self.eager = fn
        self.buckets = check_buckets(buckets)
        self.cuda_graphs = cuda_graphs
        self.timestep_arg = timestep_arg
        self.background = background and not cuda_graphs  # CUDA graphs: built on the device thread only
        mode = "reduce-overhead" if cuda_graphs else None
        self.compiled = torch.compile(fn, dynamic=False, fullgraph=True, mode=mode)
        self.ready: set[Any] = set()
        self._pending: set[Any] = set()
        self._lock = threading.Lock()
        self.stats = CallStats()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows = args[0].shape[0]
        invariant = batch_invariance.active()
        unit = invariant.unit if invariant is not None else rows
        if invariant is not None and rows > unit and rows % unit == 0:
            # batch-invariant: each unit through the very call it gets alone
            with batch_invariance.suspended():
                parts = [self._call(*_rows(args, s, s + unit, rows), **_rows(kwargs, s, s + unit, rows))
                         for s in range(0, rows, unit)]
            return _concat(parts)
        if invariant is not None:
            with batch_invariance.suspended():
                return self._call(*args, **kwargs)
        return self._call(*args, **kwargs)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("return_dict", None)  # the compiled function returns the output tensor itself
        rows = args[0].shape[0]
        bucket = bucket_for(rows, self.buckets)
        if bucket is None:  # more rows than the largest bucket: eager
            self.stats.eager_calls += 1
            return self.eager(*args, **kwargs)
        padded, padded_kwargs = self._inputs(args, kwargs, rows, bucket)
        key = (bucket, _key(padded), _key(padded_kwargs), torch.is_grad_enabled(), torch.get_num_threads())
        if key not in self.ready and getattr(_BUILD_NOW, "active", False):
            self._build(key, padded, padded_kwargs, background=False)  # build_missing_now: here, then run it
        if key not in self.ready:  # eager on the rows as they came: the uncompiled model's very bits
            self._request_build(key, padded, padded_kwargs)
            self.stats.eager_calls += 1
            return self.eager(*args, **kwargs)
        args, kwargs = padded, padded_kwargs
        self.stats.compiled_calls += 1
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return _slice(self.compiled(*args, **kwargs), rows, clone=True)
        return _slice(self.compiled(*args, **kwargs), rows)

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any], rows: int,
                bucket: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = list(args)  # type: ignore[assignment]
        if self.timestep_arg is not None:
            t = torch.as_tensor(args[self.timestep_arg], device=args[0].device).to(torch.float32)
            args[self.timestep_arg] = t.repeat(rows) if t.dim() == 0 else t  # type: ignore[index]
        return tuple(_pad(a, rows, bucket) for a in args), _pad(kwargs, rows, bucket)

    def _request_build(self, key: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.background:
            return
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        example = _clone((args, kwargs))
        BUILDER.submit(lambda: self._build(key, *example, background=True))

    def build(self, *args: Any, **kwargs: Any) -> float:
        """Build (now, on this thread) the graph that a call with these inputs uses; its seconds."""
        kwargs.pop("return_dict", None)
        rows = args[0].shape[0]
        bucket = bucket_for(rows, self.buckets)
        if bucket is None:
            raise ValueError(f"{self.name}: {rows} rows is over the largest compile bucket {self.buckets[-1]}")
        args, kwargs = self._inputs(args, kwargs, rows, bucket)
        key = (bucket, _key(args), _key(kwargs), torch.is_grad_enabled(), torch.get_num_threads())
        return self._build(key, args, kwargs, background=False)

    def _build(self, key: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, background: bool) -> float:
        """Compile the graph of ``key`` under the global state its calls run with (grad mode, intra-op
        threads: dynamo guards on both, and a thread starts with its own thread count)."""
        if key in self.ready:
            return 0.0
        grad, threads = key[-2], key[-1]
        with _BUILD_LOCK, torch.set_grad_enabled(grad):
            if key in self.ready:  # built by the builder thread while this one waited for the lock
                return 0.0
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
            start = time.perf_counter()
            if self.cuda_graphs:
                for _ in range(3):  # CUDA graph trees record on a later call than the first
                    torch.compiler.cudagraph_mark_step_begin()
                    self.compiled(*args, **kwargs)
            else:
                self.compiled(*args, **kwargs)
            seconds = time.perf_counter() - start
        with self._lock:
            self.ready.add(key)
            self._pending.discard(key)
        self.stats.builds.append({"rows": key[0], "seconds": round(seconds, 3), "background": background})
        logger.info("%s: built the graph of %d rows %s in %.1f s%s", self.name, key[0], _shape_text(args[0]),
                    seconds, " (off the request path)" if background else "")
        return seconds


def _shape_text(sample: torch.Tensor) -> str:
    return "x".join(str(s) for s in sample.shape[1:])


def _clone(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def _slice(output: Any, rows: int, clone: bool = False) -> Any:
    if isinstance(output, tuple | list):
        return type(output)(_slice(o, rows, clone) for o in output)
    if isinstance(output, torch.Tensor) and output.dim() >= 1:
        output = output[:rows]
        return output.clone() if clone else output
    return output


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, tuple | list):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    return first


class CompiledModel:
    """A loaded model's compiled UNet (``unet``, called as the UNet is), VAE decodes (``decoder(vae)``) and
    encodes (``encoder(vae)``)."""

    def __init__(self, unet: torch.nn.Module, device: torch.device, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 *, cuda_graphs: bool = True, background: bool = True) -> None:
        batch_invariance.install()  # before any graph: they see the wrappers, which pass through when compiled
        self.buckets = check_buckets(buckets)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.background = background

        def denoise(sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return unet(sample, timestep, **kwargs, return_dict=False)[0]

        self.unet = CompiledCall("unet", denoise, self.buckets, cuda_graphs=self.cuda_graphs, timestep_arg=1,
                                 background=background)
        self._decoders: dict[int, CompiledCall] = {}
        self._encoders: dict[int, CompiledCall] = {}  # used by stream sessions (one frame a call)
        self._lock = threading.Lock()

    def decoder(self, vae: Any) -> CompiledCall:
        """``latents -> pixels`` of ``vae`` (its ``decode(..., return_dict=False)[0]``), compiled per bucket."""
        def decode(latents: torch.Tensor) -> torch.Tensor:
            return vae.decode(latents, return_dict=False)[0]

        return self._vae_call(self._decoders, "decode", vae, decode)

    def encoder(self, vae: Any) -> CompiledCall:
        """``pixels -> latents`` of ``vae`` before scaling (an AutoencoderKL's posterior mode, an
        AutoencoderTiny's latents: what ``engine._vae_encode`` takes without generators), compiled per bucket."""
        def encode(pixels: torch.Tensor) -> torch.Tensor:
            encoded = vae.encode(pixels, return_dict=False)[0]
            return encoded if isinstance(encoded, torch.Tensor) else encoded.mode()  # KL: the posterior

        return self._vae_call(self._encoders, "encode", vae, encode)

    def _vae_call(self, calls: dict[int, CompiledCall], kind: str, vae: Any,
                  function: Callable[[torch.Tensor], torch.Tensor]) -> CompiledCall:
        """The shared compiled call of ``vae``'s ``kind`` (one per autoencoder object), made on first use."""
        with self._lock:
            if id(vae) not in calls:
                calls[id(vae)] = CompiledCall(f"{kind}:{type(vae).__name__}", function, self.buckets,
                                              cuda_graphs=self.cuda_graphs, background=self.background)
            return calls[id(vae)]

    def calls(self) -> list[CompiledCall]:
        return [self.unet, *self._decoders.values(), *self._encoders.values()]

    def summary(self) -> dict[str, Any]:
        return {call.name: {"graphs": len(call.ready), "compiled_calls": call.stats.compiled_calls,
                            "eager_calls": call.stats.eager_calls, "builds": list(call.stats.builds)}
                for call in self.calls()}


def warm(model: Any, width: int | None = None, height: int | None = None, vaes: Sequence[Any] | None = None, *,
         unet_rows: Sequence[int] | None = None, decode_rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Build now, on this thread, the graphs of ``model``'s compiled UNet and decode (of ``vaes``: the
    pipeline's VAE by default) at ``width`` x ``height`` (the model's default size) for ``unet_rows`` and
    ``decode_rows`` (default: every bucket); one ``{"call", "rows", "seconds"}`` per graph. The server
    calls it at startup, before readiness."""
    compiled: CompiledModel = model.compiled_model()
    default_w, default_h = model.default_size
    factor = model.vae_scale_factor
    size = ((height or default_h) // factor, (width or default_w) // factor)
    unet = model.pipeline.unet
    time_ids = None
    if model.family == "sdxl":
        from accel_diffusion.engine.engine import _sdxl_time_ids

        time_ids = _sdxl_time_ids(model, width or default_w, height or default_h)
    built = []
    with torch.no_grad():
        for rows in unet_rows or compiled.buckets:
            kwargs = model.prompt_encoder.conditioning(["warm-up"] * rows, None, False, time_ids).model_kwargs(
                ("cond",))
            sample = torch.zeros(rows, unet.config.in_channels, *size, device=model.device, dtype=model.dtype)
            seconds = compiled.unet.build(sample, torch.tensor(999.0, device=model.device), **kwargs)
            built.append({"call": "unet", "rows": rows, "seconds": round(seconds, 3)})
        for vae in vaes if vaes is not None else [model.pipeline.vae]:
            decoder = compiled.decoder(vae)
            for rows in decode_rows or compiled.buckets:
                latents = torch.zeros(rows, vae.config.latent_channels, *size, device=model.device, dtype=vae.dtype)
                seconds = decoder.build(latents)
                built.append({"call": decoder.name, "rows": rows, "seconds": round(seconds, 3)})
    return built
