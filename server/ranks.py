"""The multi-rank server: ``accel-diffusion serve`` started under torchrun (``WORLD_SIZE`` > 1).

Rank 0 is the ordinary server (HTTP, job store, device worker); its engine is a ``LeaderEngine``, which
announces every generation (the request, its seeds) to the other ranks through the rendezvous store and
runs it under the ``patch_parallel`` runtime; every other rank runs ``follow``: it loads the same models
and runs each announced generation on its own band of rows. The runtime all-gathers the output, so rank 0
holds the whole image and answers.

Every step, before its model call, every rank joins one all-reduce of a stop flag (``StepFlag``): rank 0
raises it when the job is cancelled, so every rank stops at the same step and no rank is left waiting in a
collective. Each rank also beats a heartbeat counter in the store; a rank not heard from for
``parallel_heartbeat_s`` (or a collective that fails: gloo reports a dead peer at once, a silent one after
``parallel_timeout_s``) marks the group lost on rank 0: readiness answers 503 with the reason, the running
job and the queued ones fail with ``rank_lost``, new jobs are refused. Errors that every rank meets alike
(validation: the same request on every rank) fail the job on every rank and the group goes on.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from accel_diffusion.server.settings import ServerSettings
from PIL import Image

from accel_diffusion.engine import Engine, GenerationHooks
from accel_diffusion.engine.engine import GenerationResult, image_seeds
from accel_diffusion.engine.hooks import NO_HOOKS
from accel_diffusion.errors import AccelDiffusionError, GenerationCancelled
from accel_diffusion.strategy import GenerationRequest, Strategy

log = logging.getLogger("accel_diffusion.server")
ANNOUNCE_POLL_S = 0.02  # how often an idle rank looks for rank 0's next job


class RankLostError(AccelDiffusionError):
    """A rank of the multi-rank server died, hung or failed: the process group cannot run jobs any more."""

    error_type = "rank_lost"


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1").strip()
    return int(value) if value.isdigit() else 1


class RankGroup:
    """This process's place in the multi-rank server: the torch.distributed group (gloo on CPU, NCCL on
    CUDA, collectives timing out after ``parallel_timeout_s``), job announcements through the rendezvous
    store, and the heartbeats (one thread, its own store connection)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        cuda = torch.cuda.is_available() and settings.device in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=settings.parallel_timeout_s))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        run = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(run, src=0)  # keys of this run only (an agent's store outlives restarts)
        self.prefix = f"accel_diffusion/serve/{run[0]}/"
        self.address = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))
        self.store = self._connect()  # announcements (rank 0's worker thread, a follower's main thread)
        self.lost: str | None = None  # why the group can run no more jobs (rank 0)
        self._sequence = 0
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._heartbeats, name=f"accel-diffusion-rank{self.rank}-heartbeat",
                                       daemon=True)
        self._beats.start()

    def _connect(self) -> dist.TCPStore:
        return dist.TCPStore(self.address[0], self.address[1], is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=self.settings.parallel_timeout_s))

    # ---- liveness -------------------------------------------------------------------------

    def mark_lost(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.error("patch-parallel group lost: %s", reason)

    def _heartbeats(self) -> None:
        """Beat this rank's counter every fifth of ``parallel_heartbeat_s`` and watch the others' (rank 0
        watches every rank, the others watch rank 0); a counter that has not moved for
        ``parallel_heartbeat_s`` is a lost rank. A follower whose rank 0 is lost exits (status 1)."""
        limit = self.settings.parallel_heartbeat_s
        watched = range(1, self.world_size) if self.rank == 0 else [0]
        seen: dict[int, tuple[int, float]] = {}
        try:
            store = self._connect()
            while not self._stop.wait(limit / 5):
                store.add(self.prefix + f"beat/{self.rank}", 1)
                now = time.monotonic()
                for rank in watched:
                    count = store.add(self.prefix + f"beat/{rank}", 0)
                    if rank not in seen or seen[rank][0] != count:
                        seen[rank] = (count, now)
                    elif now - seen[rank][1] > limit:
                        self._lost_rank(f"rank {rank} of {self.world_size} sent no heartbeat for {limit:g} s "
                                        "(parallel_heartbeat_s); restart every rank")
                        return
        except Exception as exc:  # the store is gone: so is the process hosting it (rank 0 or the agent)
            if not self._stop.is_set():
                self._lost_rank(f"the rendezvous store at {self.address[0]}:{self.address[1]} is unreachable "
                                f"({type(exc).__name__}); restart every rank")

    def _lost_rank(self, reason: str) -> None:
        self.mark_lost(reason)
        if self.rank != 0:  # rank 0 is gone: nothing will announce or answer a job again
            log.error("rank %d exits: %s", self.rank, reason)
            os._exit(1)

    # ---- jobs -----------------------------------------------------------------------------

    def announce(self, payload: dict[str, Any]) -> None:
        """Rank 0: publish the next job (or ``{"stop": true}``) for every other rank."""
        self.store.set(self.prefix + f"job/{self._sequence}", json.dumps(payload))
        self._sequence += 1

    def next_job(self) -> dict[str, Any]:
        """Another rank: wait for rank 0's next announcement; the last reader deletes it."""
        key = self.prefix + f"job/{self._sequence}"
        while not self.store.check([key]):  # polled: a store wait that times out logs a warning each time
            time.sleep(ANNOUNCE_POLL_S)
        payload = json.loads(self.store.get(key))
        if self.store.add(self.prefix + f"read/{self._sequence}", 1) == self.world_size - 1:
            self.store.delete_key(key)
            self.store.delete_key(self.prefix + f"read/{self._sequence}")
        self._sequence += 1
        return payload

    def close(self) -> None:
        """Rank 0: tell the other ranks to exit; every rank: leave the process group."""
        if self.rank == 0 and self.lost is None:
            self.announce({"stop": True})
        self._stop.set()
        if self.lost is None:
            dist.destroy_process_group()


class StepFlag:
    """The engine's ``cancel`` hook on every rank: one all-reduce (max) of a stop flag before each model
    call, so every rank leaves the loop at the same step. ``local`` is this rank's wish (rank 0: the job was
    cancelled)."""

    def __init__(self, local: Callable[[], bool]) -> None:
        self.local = local

    def __call__(self) -> bool:
        flag = torch.tensor([1 if self.local() else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def default_runtime(settings: ServerSettings) -> dict[str, Any]:
    """The runtime a request that names none runs under."""
    return {"name": "patch_parallel", "mode": settings.parallel_mode, "warmup_steps": settings.parallel_warmup_steps,
            "rho": settings.parallel_rho}


def with_runtime(request: GenerationRequest, runtime: dict[str, Any]) -> GenerationRequest:
    """``request`` under ``runtime`` unless its strategy names one of its own."""
    if request.strategy.runtime is not None:
        return request
    strategy = Strategy.parse({**request.strategy.model_dump(exclude_none=True), "runtime": runtime})
    return request.model_copy(update={"strategy": strategy})


def encode_job(request: GenerationRequest, seeds: Sequence[int], batch_invariant: bool) -> dict[str, Any]:
    """A job as JSON for the store (the init image as PNG: lossless)."""
    image = None
    if request.init_image is not None:
        buffer = io.BytesIO()
        request.init_image.save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"request": request.model_dump(mode="json", exclude={"init_image"}), "init_image": image,
            "seeds": list(seeds), "batch_invariant": batch_invariant}


def decode_job(payload: dict[str, Any], settings: ServerSettings) -> tuple[GenerationRequest, list[int], bool]:
    request = GenerationRequest.model_validate(payload["request"], context={"limits": settings.request_limits()})
    if payload["init_image"] is not None:
        image = Image.open(io.BytesIO(base64.b64decode(payload["init_image"])))
        image.load()
        request = request.model_copy(update={"init_image": image})
    return request, payload["seeds"], payload["batch_invariant"]


def gather_reports(result: GenerationResult) -> None:
    """Every rank's communication report in the result (one all_gather_object on every rank)."""
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, result.extra.get("communication"))
    result.extra["communication"] = reports


class LeaderEngine:
    """Rank 0's engine: announces each generation to the other ranks, then runs it (under the server's
    default runtime unless the request names one) with the per-step stop flag."""

    def __init__(self, engine: Engine, group: RankGroup) -> None:
        self.engine = engine
        self.group = group
        self.models = engine.models
        self.limits = engine.limits
        self.runtime = default_runtime(group.settings)

    def generate(self, request: GenerationRequest, hooks: GenerationHooks = NO_HOOKS, *,
                 seeds: Sequence[int] | None = None, batch_invariant: bool = False) -> GenerationResult:
        if self.group.lost is not None:
            raise RankLostError(f"the patch-parallel group cannot run jobs: {self.group.lost}")
        request = with_runtime(request, self.runtime)
        seeds = list(seeds) if seeds is not None else image_seeds(request.seed, request.num_images)
        try:
            self.group.announce(encode_job(request, seeds, batch_invariant))
            result = self.engine.generate(request, replace(hooks, cancel=StepFlag(hooks.cancelled)), seeds=seeds,
                                          batch_invariant=batch_invariant)
            gather_reports(result)
            return result
        except AccelDiffusionError:  # validation or a cancel: every rank met it at the same point
            raise
        except Exception as exc:  # a collective failed (a rank died or hung) or this rank broke mid-step
            self.group.mark_lost(f"a collective failed on rank 0 ({type(exc).__name__}: {str(exc)[:200]}); "
                                 "restart every rank")
            raise RankLostError(f"the patch-parallel group failed during the job: {self.group.lost}") from exc


def follow(settings: ServerSettings, group: RankGroup) -> None:
    """A rank other than 0: load the served models, then run every generation rank 0 announces, until it
    announces the stop. SIGTERM (torchrun forwards the pod's) is noted and ignored: the rank stays until rank 0
    has drained its jobs and says stop."""
    from accel_diffusion.server.app import served_registry

    logging.basicConfig(level=logging.INFO, format=f"rank {group.rank}: %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM; waiting for rank 0's stop"))
    registry = served_registry(settings)
    engine = Engine(registry, limits=None)
    for model_id in settings.served_models:
        registry.get(model_id)
    log.info("ready (%d ranks): following rank 0", group.world_size)
    while True:
        payload = group.next_job()
        if payload.get("stop"):
            log.info("rank 0 said stop")
            return
        request, seeds, batch_invariant = decode_job(payload, settings)
        try:
            result = engine.generate(request, GenerationHooks(cancel=StepFlag(lambda: False)), seeds=seeds,
                                     batch_invariant=batch_invariant)
            gather_reports(result)
        except GenerationCancelled as exc:
            log.info("job cancelled at step %d/%d", exc.step, exc.total)
        except AccelDiffusionError as exc:  # rank 0 met the same error and answers it
            log.info("job failed alike on every rank: %s", exc)
        except Exception as exc:  # a collective failed (a peer died or hung) or this rank broke mid-step
            group.mark_lost(f"rank {group.rank}: {type(exc).__name__}: {str(exc)[:200]}")
            raise


def serve_ranks(settings: ServerSettings, drain_timeout_s: float = 600.0) -> None:
    """``accel-diffusion serve`` under torchrun: rank 0 serves HTTP, the others follow it."""
    from accel_diffusion.server.process import serve

    if settings.queue_backend != "memory":
        raise ValueError("a multi-rank server (WORLD_SIZE > 1) keeps its jobs in memory: queue_backend = 'memory'")
    group = RankGroup(settings)
    try:
        if group.rank == 0:
            serve(settings, drain_timeout_s, ranks=group)
        else:
            follow(settings, group)
    finally:
        group.close()
    if group.lost is not None:
        os._exit(1)  # a broken gloo group aborts the interpreter's exit; the launcher sees a failed rank
