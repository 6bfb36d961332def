"""Running a manifest: locally on the engine or against a server, resumable, sharded, exactly once."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from accel_diffusion.batch.manifest import PlannedRequest, in_shard, read_manifest
from accel_diffusion.batch.outputs import BatchOutputs
from accel_diffusion.errors import AccelDiffusionError
from accel_diffusion.imageio import encode_image


class Backend(Protocol):
    """Generates one planned request: its encoded images and the metadata of its result."""

    mode: str
    concurrency: int

    def default_model(self) -> str: ...

    def run(self, planned: PlannedRequest) -> tuple[list[bytes], dict[str, Any]]: ...


class LocalBackend:
    """In-process on the engine, one request at a time, batch-invariant (the server's default), so
    that a request gives the same bytes here and through a server."""

    mode = "local"
    concurrency = 1

    def __init__(self, models_file: str | Path | None = None) -> None:
        from accel_diffusion.engine import Engine
        from accel_diffusion.models.registry import ModelRegistry

        self.registry = ModelRegistry.from_file(models_file)
        self.engine = Engine(self.registry)

    def default_model(self) -> str:
        return next(iter(self.registry.specs))  # the registry file's first model (built-in: shapes)

    def run(self, planned: PlannedRequest) -> tuple[list[bytes], dict[str, Any]]:
        request = planned.generation_request()
        result = self.engine.generate(request, batch_invariant=True)
        fmt, compression = planned.request["output_format"], planned.request["output_compression"]
        images = [encode_image(pixels, fmt, compression) for pixels in result.to_uint8()]
        return images, {"seeds": result.seeds, "strategy": result.strategy.model_dump(exclude_none=True),
                        "timings": result.timings, "nfe": result.nfe, "width": result.width,
                        "height": result.height, "steps": result.steps,
                        **({"ar": result.extra["ar"]} if "ar" in result.extra else {})}


class ServerBackend:
    """Through a server's jobs API with ``concurrency`` requests in flight (the SDK retries 429/503)."""

    mode = "server"

    def __init__(self, base_url: str, concurrency: int = 4, api_key: str | None = None, max_retries: int = 8) -> None:
        from accel_diffusion.clients import AccelClient

        self.client = AccelClient(base_url, api_key=api_key, max_retries=max_retries)
        self.concurrency = concurrency

    def default_model(self) -> str:
        return self.client.models()[0]["id"]

    def run(self, planned: PlannedRequest) -> tuple[list[bytes], dict[str, Any]]:
        fields = dict(planned.request)
        fields.pop("init_image_sha256", None)
        prompt = fields.pop("prompt")
        fields.pop("strength", None)
        if planned.init_image is not None:
            output = self.client.edit(planned.init_image, prompt, strength=planned.request["strength"], **fields)
        else:
            output = self.client.generate(prompt, **fields)
        images = [base64.b64decode(image["b64_json"]) for image in output.raw["images"]]
        return images, {"seeds": output.seeds, "strategy": output.strategy, "timings": output.timings,
                        "nfe": output.nfe, "width": output.width, "height": output.height, "steps": output.steps,
                        "job_id": output.job_id, **({"ar": output.raw["ar"]} if "ar" in output.raw else {})}

    def close(self) -> None:
        self.client.close()


@dataclass
class BatchReport:
    requests: int = 0  # valid lines of this shard
    generated: int = 0
    already_done: int = 0  # finished by an earlier run
    duplicates: int = 0  # lines whose normalized request equals an earlier line's: one output for both
    failed: int = 0
    invalid: int = 0
    images: int = 0
    wall_s: float = 0.0
    results_path: Path | None = None
    errors_path: Path | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.invalid == 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


def run_batch(manifest: str | Path, out_dir: str | Path, backend: Backend, shard_index: int = 0,
              num_shards: int = 1, progress: bool = True, default_model: str | None = None) -> BatchReport:
    """Run this shard's part of ``manifest`` into ``out_dir``; finished requests are skipped.

    Lines without a model use ``default_model`` (else the backend's: the registry's first model, or
    the server's default)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is not in [0, {num_shards})")
    planned, line_errors = read_manifest(manifest, default_model or backend.default_model())
    planned = [p for p in planned if in_shard(p, shard_index, num_shards)]
    errors = [e.as_dict() for e in line_errors if in_shard(e, shard_index, num_shards)]
    outputs = BatchOutputs(out_dir, shard_index, num_shards)
    report = BatchReport(requests=len(planned), invalid=len(errors))

    first_of_key: dict[str, PlannedRequest] = {}
    for p in planned:
        first_of_key.setdefault(p.key, p)
    todo = [p for key, p in first_of_key.items() if not outputs.is_done(key)]
    report.duplicates = len(planned) - len(first_of_key)
    report.already_done = len(first_of_key) - len(todo)

    begin = time.perf_counter()
    lock = threading.Lock()
    bar = tqdm(total=sum(p.num_images for p in todo), unit="img", desc=f"batch ({backend.mode})",
               disable=not progress, dynamic_ncols=True)

    def one(p: PlannedRequest) -> None:
        started = time.perf_counter()
        try:
            images, meta = backend.run(p)
            meta["timings"] = {**meta.get("timings", {}), "wall": time.perf_counter() - started}
            record = {"line": p.line, "id": p.item.id, "key": p.key, "mode": backend.mode, "request": p.request,
                      **meta}
            outputs.write_request(p.key, images, p.request["output_format"], record, p.output_name)
        except Exception as exc:  # one request's failure (generation or writing it) is recorded; the batch goes on
            with lock:
                report.failed += 1
                errors.append(_failure(p, exc))
            return
        with lock:
            report.generated += 1
            report.images += len(images)
            bar.update(len(images))

    try:
        if backend.concurrency <= 1:
            for p in todo:
                one(p)
        else:
            with ThreadPoolExecutor(backend.concurrency, thread_name_prefix="batch") as pool:
                pending: set[Future[None]] = set()
                for p in todo:  # bounded submission: at most 2 x concurrency requests queued here
                    if len(pending) >= 2 * backend.concurrency:
                        _, pending = wait(pending, return_when=FIRST_COMPLETED)
                    pending.add(pool.submit(one, p))
                wait(pending)
    finally:
        bar.close()
    report.wall_s = time.perf_counter() - begin

    records = []
    for p in planned:
        if outputs.is_done(p.key):
            records.append({**outputs.record(p.key), "line": p.line, "id": p.item.id})
    report.errors = errors
    report.results_path, report.errors_path = outputs.write_summaries(records, errors)
    return report


def _failure(planned: PlannedRequest, exc: Exception) -> dict[str, Any]:
    if isinstance(exc, AccelDiffusionError):
        kind, field_name = exc.error_type, getattr(exc, "field", None)
    else:  # the SDK's errors carry the server's error type and field
        kind, field_name = getattr(exc, "type", None) or type(exc).__name__, getattr(exc, "param", None)
    return {"line": planned.line, "kind": "failed", "key": planned.key, "type": kind, "field": field_name,
            "message": getattr(exc, "message", None) or str(exc)}
