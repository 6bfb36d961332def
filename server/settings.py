"""The server's one configuration object: environment variables (ACCEL_DIFFUSION_*) and a TOML file."""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from accel_diffusion.server.hosts import is_loopback
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from accel_diffusion.strategy import DEFAULT_LIMITS, RequestLimits

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


class ServerSettings(BaseSettings):
    """Models, worker, queue and batch limits, request limits, API keys, CORS.

    Precedence: keyword arguments > environment (``ACCEL_DIFFUSION_<FIELD>``, lists as JSON) >
    the TOML file given to :meth:`from_file` > defaults.
    """

    model_config = SettingsConfigDict(env_prefix="ACCEL_DIFFUSION_", extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    models_file: Path | None = Field(None, description="model registry TOML (default: $ACCEL_DIFFUSION_MODELS, "
                                                       "else the built-in models)")
    served_models: list[str] = Field(["shapes"], min_length=1, description="model ids to load and warm up at "
                                     "start-up; requests may name only these")
    device: str = Field("auto", description="overrides every served model's device ('auto': CUDA when present)")
    queue_max: Annotated[int, Field(ge=1)] = 64
    max_batch_size: Annotated[int, Field(ge=1, le=64)] = 1
    max_batch_wait_ms: Annotated[float, Field(ge=0)] = 0.0
    batch_invariant: bool = Field(True, description="an image is bit-identical whether it ran alone or in a "
                                  "batch (per-sample kernels: slower batches); false: batches run faster and "
                                  "images agree only to float rounding")
    # request limits: the defaults are RequestLimits' (one definition for the server, CLI and Python API)
    max_width: Annotated[int, Field(ge=8)] = DEFAULT_LIMITS.max_width
    max_height: Annotated[int, Field(ge=8)] = DEFAULT_LIMITS.max_height
    max_pixels: Annotated[int, Field(ge=64)] = DEFAULT_LIMITS.max_pixels
    max_steps: Annotated[int, Field(ge=1, le=1000)] = DEFAULT_LIMITS.max_steps
    max_images: Annotated[int, Field(ge=1)] = DEFAULT_LIMITS.max_images
    max_prompt_chars: Annotated[int, Field(ge=1)] = DEFAULT_LIMITS.max_prompt_chars
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(DEFAULT_LIMITS.max_init_image_bytes, description=(
        "largest request body; also the largest init image"))
    request_read_timeout_s: float = Field(30.0, gt=0, description="a connection must send a complete request "
                                          "(headers and body) within this many seconds of opening or of its "
                                          "previous response, else it is closed (408 while in its headers)")
    api_keys: list[SecretStr] = Field([], description="Bearer tokens; empty = no authentication")
    api_keys_file: Path | None = Field(None, description="one API key per line (e.g. a mounted secret)")
    cors_origins: list[str] = Field([], description="allowed browser origins; empty = CORS closed")
    allowed_hosts: list[str] | None = Field(None, description="Host header names served (IPs, names, "
                                            "'*.example.com' for its subdomains, '*' for any); others get 421. "
                                            "Default: the loopback names when host is a loopback address, "
                                            "else '*'. /health/* answers any Host (probes send the pod IP)")
    allowed_origins: list[str] = Field([], description="browser origins (scheme://name[:port]) besides the "
                                       "server's own and cors_origins that may open WS /v1/stream and send "
                                       "requests (e.g. the public origin when a proxy rewrites Host); "
                                       "a request with another Origin header gets 403")
    job_ttl_s: Annotated[float, Field(gt=0)] = 3600.0
    max_finished_jobs: Annotated[int, Field(ge=1)] = 1000
    max_job_image_bytes: int = Field(1 << 30, ge=0, description="base64 bytes of finished jobs' images kept in "
                                     "all; past it the oldest jobs' images are released (the jobs stay, with "
                                     "their metadata and seeds, marked images_released)")
    # per-key quotas (each API key; without keys the one tenant), under the global caps above and below
    key_max_queued_jobs: int = Field(16, ge=1, description="a key's queued jobs; past it a new job gets 429 "
                                     "quota_exceeded (the server's is queue_max)")
    key_max_running_jobs: int = Field(16, ge=1, description="a key's jobs in one running batch (the others "
                                      "wait for the next batch)")
    key_max_finished_jobs: int = Field(250, ge=1, description="a key's finished jobs kept; past it that key's "
                                       "oldest are dropped (past max_finished_jobs, the key keeping the most's)")
    key_max_job_image_bytes: int = Field(256 << 20, ge=0, description="base64 bytes of a key's finished jobs' "
                                         "images kept; past it that key's oldest are released (past "
                                         "max_job_image_bytes, the key holding the most's)")
    max_sse_listeners: int = Field(256, ge=1, description="job event streams open at once on the server")
    key_max_sse_listeners: int = Field(32, ge=1, description="job event streams open at once for a key")
    max_sse_listeners_per_job: int = Field(8, ge=1, description="event streams open at once on one job")
    key_max_stream_sessions: int = Field(2, ge=0, description="stream sessions open at once for a key (the "
                                         "server's is max_stream_sessions)")
    warmup_steps: Annotated[int, Field(ge=0)] = 2
    max_stream_sessions: Annotated[int, Field(ge=0)] = 4
    stream_idle_timeout_s: float = Field(60.0, gt=0, description="a stream connection with no input for this "
                                         "long (accepted frames, frame requests, session or parameter messages "
                                         "that succeed) is closed with 1000")
    stream_control_rate: float = Field(20.0, gt=0, description="text messages per second a stream connection may "
                                       "send, frame.request aside, after a burst of stream_control_burst; past it "
                                       "a message is dropped with a rate_limited error")
    stream_control_burst: int = Field(40, ge=1, description="text messages a stream connection may send at once; "
                                      "this many dropped in a row close the connection with 1008")
    stream_acceleration: Literal["none", "compile"] | None = Field(
        None, description="stream sessions' acceleration; default (unset): engine_acceleration's")
    max_frame_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest stream input frame; a larger one "
                                 "gets an invalid_frame error (a WebSocket message past twice this, at least "
                                 "16 MiB, closes the connection with 1009)")
    stream_share: float = Field(0.5, gt=0, lt=1, description="the device worker's time that stream frames get "
                                "while jobs wait too (the jobs get the rest; a lane alone gets all), shared by "
                                "measured wall time")
    stream_max_width: int = Field(512, ge=8, description="widest stream session (under max_width); a wider "
                                  "session.start gets stream_limit_exceeded")
    stream_max_height: int = Field(512, ge=8, description="tallest stream session (under max_height)")
    stream_max_steps: int = Field(4, ge=1, le=50, description="most denoising steps (t_index_list entries) of "
                                  "a stream frame")

    # scale-out (docs: README "Scale-out: a shared Redis queue")
    queue_backend: Literal["memory", "redis"] = Field(
        "memory", description="where jobs, their queue, events and results live: in this process (one server), or "
        "in Redis at redis_url, shared by every API and worker process (pip install 'accel-diffusion[redis]')")
    redis_url: str | None = Field(None, description="with queue_backend = 'redis': e.g. redis://127.0.0.1:6379/0")
    redis_prefix: str = Field("ad", min_length=1, description="prefix of every Redis key (several deployments "
                              "can share one Redis)")
    role: Literal["all", "api", "worker"] = Field(
        "all", description="with queue_backend = 'redis': 'api' validates, queues and answers jobs and never loads a "
        "model; 'worker' loads the models and runs the queued jobs; 'all' both")
    lease_s: float = Field(30.0, gt=0, description="a worker holds a claimed job this long past its last renewal "
                           "(renewed every third of it); a dead worker's job runs again elsewhere after it")
    max_deliveries: int = Field(3, ge=1, description="a queued job is started at most this many times: past it "
                                "(each worker died or lost its lease running it) it ends failed (worker_lost) and "
                                "moves to the dead-letter stream {redis_prefix}:dead:{model}")
    worker_name: str | None = Field(None, description="this worker's consumer name in the Redis queue, stable "
                                    "and unique per worker (default: host name and process id)")

    # multi-rank serving under torchrun (docs/parallel.md "A multi-rank server")
    parallel_mode: Literal["full_sync", "distrifusion", "pcpp", "naive"] = Field(
        "full_sync", description="under torchrun (WORLD_SIZE > 1): the patch_parallel mode of requests whose strategy "
        "names no runtime (full_sync: the single-device image)")
    parallel_warmup_steps: int = Field(4, ge=0, le=1000, description="synchronous steps of distrifusion and pcpp "
                                       "(parallel_mode)")
    parallel_rho: float = Field(0.5, gt=0, le=1, description="pcpp: the fraction of each neighbour's rows a patch "
                                "attends to (parallel_mode)")
    parallel_timeout_s: float = Field(60.0, gt=0, description="under torchrun: a collective (one exchange of a "
                                      "step) waiting longer than this fails its job and the group (readiness 503)")
    parallel_heartbeat_s: float = Field(5.0, gt=0, description="under torchrun: a rank whose heartbeat has not "
                                        "moved for this long is lost (readiness 503, its jobs fail with rank_lost)")

    @model_validator(mode="after")
    def _backend_and_role(self) -> ServerSettings:
        if self.queue_backend == "redis" and not self.redis_url:
            raise ValueError("queue_backend = 'redis' needs redis_url (e.g. redis://127.0.0.1:6379/0)")
        if self.queue_backend == "redis" and importlib.util.find_spec("redis") is None:
            raise ValueError("queue_backend = 'redis' needs the redis client: pip install 'accel-diffusion[redis]'")
        if self.role != "all" and self.queue_backend != "redis":
            raise ValueError(f"role = {self.role!r} needs queue_backend = 'redis' (with the memory backend one "
                             "process is both api and worker: role = 'all')")
        return self
    # engine_acceleration (docs: README "Compiled engine")
    engine_acceleration: Literal["none", "compile"] | None = Field(
        None, description="compile: every served model's UNet and VAE decode run as torch.compile graphs with "
        "static shapes per row bucket (compile_buckets), shared by every request, job, batch and stream; the "
        "buckets are built at startup (readiness 503 until then: minutes on a CPU from a cold inductor cache), an "
        "unforeseen shape runs eagerly while its graph is built in the background. none: eager. Unset (the "
        "default): compile when every served model's device is a CPU or CUDA device (where it measured faster), "
        "else none")
    compile_buckets: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 2, 4, 8], min_length=1, description="with engine_acceleration = 'compile': the row counts of the "
        "compiled graphs (a call's rows are padded up to the next; CFG doubles a UNet call's rows); each is "
        "built at startup at the model's default size")
    inductor_cache_dir: Path | None = Field(None, description="where torch inductor keeps compiled kernels "
                                            "(TORCHINDUCTOR_CACHE_DIR): a directory kept across restarts (a "
                                            "volume) makes the next startup warm")
    schedules_dir: Path | None = Field(None, description="folder of searched schedules (`accel-diffusion search` "
                                       "artifacts, <id>.json) looked up before the shipped ones; listed by "
                                       "GET /v1/schedules")
    profiles_dir: Path | None = Field(None, description="folder of Pareto profiles (`accel-diffusion bench pareto`, "
                                      "<model>@<device>.json) for \"strategy\": \"auto\", read before the shipped ones")
    profile_device: str | None = Field(None, description="the device key whose profiles \"strategy\": \"auto\" uses "
                                       "(default: the device each model is loaded on); needed on API-only replicas")

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard(cls, value: list[str]) -> list[str]:
        if "*" in value:
            raise ValueError("list the allowed origins explicitly; '*' is refused")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _bare_host_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not name.strip() or any(c in name for c in "/ ") or name.count(":") == 1:
                raise ValueError(f"{name!r}: give host names without scheme, path or port "
                                 "(e.g. 'gen.example.com', '*.example.com', '*')")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _explicit_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if "*" in origin or "://" not in origin or "/" in origin.split("://", 1)[1].rstrip("/"):
                raise ValueError(f"{origin!r}: give origins as scheme://name[:port] (e.g. "
                                 "'https://gen.example.com'), each explicitly; wildcards are refused")
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_blank_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value().strip() for key in value):
            raise ValueError("an API key is empty or blank: it would match a request with no token")
        return value

    @classmethod
    def from_file(cls, path: str | Path | None = None, **overrides: Any) -> ServerSettings:
        """Settings from a TOML file (a ``[server]`` table or top-level keys), then env, then ``overrides``."""
        file_values: dict[str, Any] = {}
        if path is not None:
            data = tomllib.loads(Path(path).read_text())
            file_values = data.get("server", data)

        class _FromFile(cls):  # type: ignore[valid-type,misc]
            @classmethod
            def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                           file_secret_settings):  # type: ignore[no-untyped-def]
                def file_source() -> dict[str, Any]:
                    return file_values

                return init_settings, env_settings, file_source

        return cls.model_validate(_FromFile(**overrides).model_dump())

    @property
    def stream_acceleration_used(self) -> Literal["none", "compile"]:
        """The stream sessions' acceleration: stream_acceleration, else engine_acceleration (unset: none; the
        server resolves an unset engine_acceleration first, ``resolve_acceleration``)."""
        return self.stream_acceleration or self.engine_acceleration or "none"

    def resolve_acceleration(self, device_types: Sequence[str]) -> ServerSettings:
        """These settings with ``engine_acceleration`` set: as given, or (unset) the default for the served
        models' ``device_types`` (engine/compiled.py ``default_acceleration``: compile on CPU and CUDA)."""
        from accel_diffusion.engine.compiled import default_acceleration

        if self.engine_acceleration is not None:
            return self
        return self.model_copy(update={"engine_acceleration": default_acceleration(device_types)})

    def request_limits(self) -> RequestLimits:
        return RequestLimits(max_width=self.max_width, max_height=self.max_height, max_pixels=self.max_pixels,
                             max_steps=self.max_steps, max_images=self.max_images,
                             max_prompt_chars=self.max_prompt_chars,
                             max_init_image_bytes=self.max_body_bytes)

    def served_hosts(self) -> list[str]:
        """``allowed_hosts``, or its default: the loopback names when bound to loopback, else any."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return list(LOOPBACK_HOSTS) if is_loopback(self.host) else ["*"]

    def all_api_keys(self) -> list[str]:
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines() if line.strip()]
        return keys
