"""The Python SDK against a real uvicorn server on the tiny model (images equal to the engine's, events,
resume, cancel, typed errors, auth, 429 retries), plus its retry and reconnect policy on mock transports."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from accel_diffusion.clients import (
    AccelClient,
    AccelError,
    APIConnectionError,
    AsyncAccelClient,
    AuthenticationError,
    GenerationOutput,
    ImagesReleased,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobTimeout,
    NotFound,
    QueueFull,
    RetryPolicy,
    ServiceUnavailable,
)
from accel_diffusion.clients.sdk import parse_retry_after
from accel_diffusion.server import create_app
from PIL import Image
from server_clients import init_png, make_settings, running_server

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

PROMPT = "a red circle on a blue background"
KEY = "secret"


# ---- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_url(tiny_models_file: Path) -> Iterator[str]:
    """One real server for the module: API key required, a queue of one (so floods get 429s)."""
    app = create_app(make_settings(tiny_models_file, api_keys=[KEY], queue_max=1))
    with running_server(app) as (_, _, base):
        yield base


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[AccelClient]:
    with AccelClient(base_url, KEY, timeout=60) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def engine(tiny_models_file: Path) -> Engine:
    return Engine(ModelRegistry.from_file(tiny_models_file))


def direct(engine: Engine, **fields: Any) -> Any:
    """The same request through the engine, without the server (batch-invariant, as the server)."""
    return engine.generate(GenerationRequest.create(model="tiny", **fields), batch_invariant=True)


def pixels(output: GenerationOutput) -> np.ndarray:
    return np.stack([np.asarray(image) for image in output.images])


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---- against the real server ----------------------------------------------------------------

def test_generate_returns_the_engine_images_and_metadata(client: AccelClient, engine: Engine,
                                                         tmp_path: Path) -> None:
    output = client.generate(PROMPT, n=2, size="32x32", seed=5, steps=3, guidance_scale=4.0)
    expected = direct(engine, prompt=PROMPT, n=2, seed=5, steps=3,
                      strategy={"guidance": {"name": "cfg", "scale": 4.0}})
    assert pixels(output).shape == (2, 32, 32, 3)
    assert np.array_equal(pixels(output), expected.to_uint8())
    assert output.seeds == [5, 6] and output.prompts == [PROMPT, PROMPT]
    assert output.nfe == expected.nfe == 3 * 2  # cond + uncond per step
    assert (output.width, output.height, output.steps) == (32, 32, 3)
    assert output.strategy == expected.strategy.model_dump(exclude_none=True)
    assert output.strategy["guidance"]["scale"] == 4.0
    assert set(output.timings) == set(expected.timings) | {"queue", "wall"}
    assert output.timings["wall"] >= output.timings["total"] > 0 and output.timings["queue"] >= 0
    assert output.job_id.startswith("job_") and output.raw["batch_size_used"] == 1
    paths = output.save(tmp_path / "out", "circle")
    assert [p.name for p in paths] == ["circle-0.png", "circle-1.png"]
    assert np.array_equal(np.asarray(Image.open(paths[1])), expected.to_uint8()[1])


def test_output_format_and_width_height(client: AccelClient, tmp_path: Path) -> None:
    output = client.generate(PROMPT, width=32, height=24, seed=1, steps=2, output_format="jpeg",
                             output_compression=90)
    assert output.images[0].format == "JPEG" and output.images[0].size == (32, 24)
    assert output.save(tmp_path)[0].name == "image-0.jpg"


def test_edit_is_img2img_from_a_path_bytes_or_pil_image(client: AccelClient, engine: Engine,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "init.png"
    path.write_bytes(init_png())
    from_path = client.edit(path, PROMPT, strength=0.6, n=2, seed=9, steps=5)
    expected = direct(engine, prompt=PROMPT, init_image=init_png(), strength=0.6, n=2, seed=9, steps=5)
    assert np.array_equal(pixels(from_path), expected.to_uint8())
    assert from_path.nfe == 2 * 3 and from_path.steps == 3  # int(0.6 x 5) steps run, cond + uncond
    from_pil = client.edit(Image.open(path), PROMPT, strength=0.6, n=2, seed=9, steps=5)
    from_bytes = client.edit(init_png(), PROMPT, strength=0.6, n=2, seed=9, steps=5)
    assert np.array_equal(pixels(from_pil), pixels(from_path)) and np.array_equal(pixels(from_bytes),
                                                                                  pixels(from_path))
    text_only = client.generate(PROMPT, n=2, seed=9, steps=5)
    assert not np.array_equal(pixels(text_only), pixels(from_path))


def test_async_client_gives_the_sync_images(client: AccelClient, base_url: str) -> None:
    sync_output = client.generate(PROMPT, n=2, seed=5, steps=3)
    sync_edit = client.edit(init_png(), PROMPT, strength=0.5, seed=2, steps=4)

    async def main() -> tuple[GenerationOutput, GenerationOutput, list[str], list[str], bool]:
        async with AsyncAccelClient(base_url, KEY, timeout=60) as sdk:
            output = await sdk.generate(PROMPT, n=2, seed=5, steps=3)
            edited = await sdk.edit(init_png(), PROMPT, strength=0.5, seed=2, steps=4)
            job = await sdk.submit(PROMPT, seed=1, steps=2)
            types = [event.type async for event in job.events()]
            models = [m["id"] for m in await sdk.models()]
            return output, edited, types, models, bool(await sdk.health())

    output, edited, types, models, ready = asyncio.run(main())
    assert np.array_equal(pixels(output), pixels(sync_output)) and output.seeds == [5, 6]
    assert np.array_equal(pixels(edited), pixels(sync_edit))
    assert types == ["job.queued", "job.started", "job.progress", "job.progress", "job.completed"]
    assert models == ["tiny"] and ready


def test_events_are_ordered_and_resume_after_an_id(client: AccelClient) -> None:
    job = client.submit(PROMPT, seed=1, steps=3)
    events = list(job.events())
    assert [e.type for e in events] == ["job.queued", "job.started", *["job.progress"] * 3, "job.completed"]
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert [e.data["step"] for e in events if e.type == "job.progress"] == [1, 2, 3]
    assert events[-1].data["result"]["images"][0]["seed"] == 1
    resumed = list(job.events(last_event_id=3))
    assert resumed == events[3:]
    assert list(job.events(last_event_id=events[-1].id)) == []  # nothing after the terminal event
    assert job.status()["status"] == "succeeded"
    output = job.result(timeout=30)
    assert output.seeds == [1] and output.job_id == job.id and output.raw == events[-1].data["result"]

    previewed = client.submit(PROMPT, seed=1, steps=3, preview_every=2)
    previews = [e for e in previewed.events() if e.type == "job.preview"]
    assert [e.data["step"] for e in previews] == [2] and previews[0].preview_images()[0].size == (32, 32)
    assert events[-1].preview_images() == []


def test_cancelling_a_long_job_raises_job_cancelled(client: AccelClient) -> None:
    job = client.submit(PROMPT, seed=0, steps=150)
    for event in job.events():
        if event.type == "job.progress":
            break
    assert job.cancel()["id"] == job.id
    with pytest.raises(JobCancelled) as raised:
        job.result(timeout=30)
    assert raised.value.job_id == job.id
    status = job.status()
    assert status["status"] == "cancelled" and status["progress"]["step"] < 150


def test_waiting_too_long_raises_job_timeout_and_generate_cancels(client: AccelClient) -> None:
    job = client.submit(PROMPT, seed=0, steps=150)
    begin = time.monotonic()
    with pytest.raises(JobTimeout) as raised:
        job.result(timeout=0.3)
    assert isinstance(raised.value, TimeoutError) and time.monotonic() - begin < 5
    job.cancel()
    with pytest.raises(JobTimeout) as raised:
        client.generate(PROMPT, seed=0, steps=150, timeout=0.3)
    abandoned = client.job(raised.value.job_id or "")
    wait_for(lambda: abandoned.status()["status"] == "cancelled")
    wait_for(lambda: job.status()["status"] == "cancelled")


def test_invalid_requests_name_the_field(client: AccelClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [({"n": 0}, "n"), ({"steps": 1000}, "steps"), ({"width": 33}, "width"),
                                               ({"strategy": {"sampler": {"name": "nope"}}}, "strategy.sampler.name")]
    for fields, param in cases:
        with pytest.raises(InvalidRequest) as raised:
            client.submit(PROMPT, **fields)
        assert raised.value.param == param and raised.value.status == 400, (fields, raised.value)
        assert raised.value.type == "invalid_request_error" and raised.value.request_id
    for size in ("big", "\u00b2x\u00b2", "33x32"):  # superscript digits pass str.isdigit() but not int()
        with pytest.raises(InvalidRequest) as raised:
            client.generate(PROMPT, size=size)
        assert raised.value.param == "size" and raised.value.status == 400  # the field sent, not width
    for fields, param in (({"num_inference_steps": 500}, "num_inference_steps"),
                          ({"steps": 2, "num_inference_steps": 2}, "num_inference_steps"),
                          ({"size": "32x32", "width": 32}, "size"), ({"n": 1, "num_images_per_prompt": 1},
                                                                     "num_images_per_prompt")):
        with pytest.raises(InvalidRequest) as raised:
            client.submit(PROMPT, **fields)
        assert raised.value.param == param and raised.value.status == 400, (fields, raised.value)
    with pytest.raises(NotFound) as missing_model:
        client.generate(PROMPT, model="no-such-model", steps=2)
    assert missing_model.value.status == 404 and missing_model.value.type == "model_not_found"
    assert missing_model.value.param == "model"
    with pytest.raises(NotFound) as missing_job:
        client.job("job_missing").status()
    assert missing_job.value.status == 404


def test_the_diffusers_spellings_make_the_same_images(client: AccelClient) -> None:
    aliased = client.generate(PROMPT, size="24x32", num_inference_steps=2, num_images_per_prompt=2, seed=4)
    canonical = client.generate(PROMPT, width=24, height=32, steps=2, n=2, seed=4)
    assert (aliased.width, aliased.height, aliased.steps, aliased.seeds) == (24, 32, 2, [4, 5])
    assert np.array_equal(pixels(aliased), pixels(canonical))


def test_a_mistyped_argument_names_the_meant_one_before_sending(client: AccelClient, base_url: str) -> None:
    from accel_diffusion.clients import UnknownArgument

    with pytest.raises(InvalidRequest) as raised:
        client.generate(PROMPT, stpes=2)  # type: ignore[call-arg]
    assert raised.value.param == "stpes" and raised.value.status is None and isinstance(raised.value, TypeError)
    assert raised.value.message == "stpes: unknown argument of generate(); did you mean `steps`?"
    with pytest.raises(UnknownArgument, match="did you mean `num_inference_steps`"):
        client.submit(PROMPT, num_inference_step=2)  # type: ignore[call-arg]

    async def typo() -> None:
        async with AsyncAccelClient(base_url, KEY) as sdk:
            await sdk.edit(init_png(), PROMPT, sise="32x32")  # type: ignore[call-arg]

    with pytest.raises(UnknownArgument, match="did you mean `size`"):
        asyncio.run(typo())


def test_api_keys(base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with AccelClient(base_url, "wrong", max_retries=0) as wrong, pytest.raises(AuthenticationError) as raised:
        wrong.models()
    assert raised.value.status == 401 and "API key" in raised.value.message
    monkeypatch.delenv("ACCEL_DIFFUSION_API_KEY", raising=False)
    with AccelClient(base_url) as anonymous:
        with pytest.raises(AuthenticationError):
            anonymous.submit(PROMPT, steps=2)
        assert anonymous.health().ready  # the health routes are open
    monkeypatch.setenv("ACCEL_DIFFUSION_API_KEY", KEY)
    with AccelClient(base_url) as from_env:
        assert [m["id"] for m in from_env.models()] == ["tiny"]


def test_models_strategies_health(client: AccelClient) -> None:
    (model,) = client.models()
    assert model["id"] == "tiny" and model["default_size"] == "32x32" and model["default_steps"] == 4
    components = client.strategies()
    assert {"ddim", "dpmpp_2m"} <= {c["name"] for c in components["sampler"]}
    assert "cfg" in {c["name"] for c in components["guidance"]}
    health = client.health()
    assert health.ready and health.status == "ready" and health.models == ["tiny"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with AccelClient(f"http://127.0.0.1:{port}", timeout=5) as nowhere:
        down = nowhere.health()
    assert not down and down.status == "unreachable"


class CountingTransport(httpx.HTTPTransport):
    """A real transport that counts the 429 answers."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


def test_a_full_queue_is_retried_or_raises_queue_full(base_url: str) -> None:
    with AccelClient(base_url, KEY, timeout=60, max_retries=0) as impatient:
        running = impatient.submit(PROMPT, seed=0, steps=150)
        wait_for(lambda: running.status()["status"] == "running")
        queued = impatient.submit(PROMPT, seed=0, steps=150)  # the one queue place
        with pytest.raises(QueueFull) as raised:
            impatient.submit(PROMPT, steps=2)
        assert raised.value.status == 429 and raised.value.type == "queue_full"
        assert raised.value.retry_after is not None and raised.value.retry_after > 0
        queued.cancel()
        running.cancel()
        wait_for(lambda: running.status()["status"] == "cancelled")

    transport = CountingTransport()
    with AccelClient(base_url, KEY, timeout=60, max_retries=10, backoff_s=0.05, transport=transport) as patient:
        patient.submit(PROMPT, seed=0, steps=20)  # keeps the worker busy while the others arrive
        with ThreadPoolExecutor(4) as pool:
            outputs = list(pool.map(lambda seed: patient.generate(PROMPT, seed=seed, steps=2), range(4)))
    assert [o.seeds for o in outputs] == [[0], [1], [2], [3]]
    assert transport.statuses.count(429) >= 1  # some were refused, and retried until they got in


# ---- retry and reconnect policy on mock transports ------------------------------------------

def job_object(job_id: str = "job_x") -> dict[str, Any]:
    return {"id": job_id, "object": "job", "status": "queued"}


def error(status: int, type_: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"type": type_, "code": type_, "message": f"{type_}!", "param": None}}
    return httpx.Response(status, json=body, headers={"X-Request-Id": "req-1", **(headers or {})})


def scripted(responses: list[httpx.Response | Exception], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = responses.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler)


def test_retry_policy_backoff_and_retry_after() -> None:
    policy = RetryPolicy(max_retries=5, backoff_s=10, max_backoff_s=25)
    assert [policy.delay(a) for a in range(4)] == [10, 20, 25, 25]
    assert policy.delay(0, retry_after=3) == 3 and policy.delay(3, retry_after=100) == 25
    assert parse_retry_after("7") == 7 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 < (parse_retry_after(in_a_minute) or 0) <= 60


def test_429_and_503_are_retried_honouring_retry_after() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    transport = scripted([error(429, "queue_full", {"Retry-After": "2"}), error(503, "unavailable"),
                          error(503, "gpu_oom", {"Retry-After": "0.25"}), httpx.Response(202, json=job_object())],
                         seen)
    with AccelClient("http://sdk.test", "k", backoff_s=0.1, transport=transport, sleep=sleeps.append) as sdk:
        job = sdk.submit("p")
    assert job.id == "job_x" and len(seen) == 4
    assert sleeps == [2.0, 0.1 * 2**1, 0.25]  # Retry-After, else backoff_s * 2**attempt
    assert {r.headers["X-Request-Id"] for r in seen} == {seen[0].headers["X-Request-Id"]}  # one logical call
    assert all(r.headers["Authorization"] == "Bearer k" for r in seen)
    assert json.loads(seen[0].content) == {"prompt": "p", "output_format": "png"}  # unset: the server's defaults


def test_retries_run_out_into_the_typed_error() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    transport = scripted([error(429, "queue_full", {"Retry-After": "3"})] * 3, seen)
    with AccelClient("http://sdk.test", max_retries=2, transport=transport, sleep=sleeps.append) as sdk, \
            pytest.raises(QueueFull) as raised:
        sdk.submit("p")
    assert len(seen) == 3 and sleeps == [3.0, 3.0]
    assert raised.value.retry_after == 3 and raised.value.request_id == "req-1" and raised.value.status == 429

    seen.clear()
    transport = scripted([error(400, "invalid_request_error"), error(503, "gpu_oom")], seen)
    with AccelClient("http://sdk.test", max_retries=0, transport=transport, sleep=sleeps.append) as sdk:
        with pytest.raises(InvalidRequest):
            sdk.submit("p")  # never retried
        with pytest.raises(ServiceUnavailable) as unavailable:
            sdk.submit("p")
    assert len(seen) == 2 and unavailable.value.type == "gpu_oom" and unavailable.value.retry_after is None


def test_connection_errors_are_retried_only_where_safe() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    refused, reset = httpx.ConnectError("refused"), httpx.ReadError("reset")
    transport = scripted([refused, reset, httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]}),
                          refused, httpx.Response(202, json=job_object()), reset], seen)
    with AccelClient("http://sdk.test", backoff_s=0.1, transport=transport, sleep=sleeps.append) as sdk:
        assert sdk.models() == [{"id": "m"}]  # GET: any connection error is retried
        assert sdk.submit("p").id == "job_x"  # POST: a refused connection never reached the server
        with pytest.raises(APIConnectionError):
            sdk.submit("p")  # POST: a broken one may have created the job, so it is not retried
    assert len(seen) == 6 and sleeps == [0.1, 0.2, 0.1]


def test_async_client_uses_the_same_policy() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def main() -> None:
        transport = scripted([error(503, "unavailable", {"Retry-After": "1"}), error(429, "queue_full"),
                              httpx.Response(202, json=job_object())], seen)
        async with AsyncAccelClient("http://sdk.test", backoff_s=0.5, transport=transport, sleep=sleep) as sdk:
            assert (await sdk.submit("p")).id == "job_x"
        transport = scripted([error(429, "queue_full", {"Retry-After": "4"})] * 2, seen)
        async with AsyncAccelClient("http://sdk.test", max_retries=1, transport=transport, sleep=sleep) as sdk:
            with pytest.raises(QueueFull) as raised:
                await sdk.submit("p")
            assert raised.value.retry_after == 4

    asyncio.run(main())
    assert sleeps == [1.0, 1.0, 4.0] and len(seen) == 5


def png_b64() -> str:
    return base64.b64encode(init_png()).decode("ascii")


RESULT = {"images": [{"b64_json": png_b64(), "seed": 3, "prompt": "p"}], "width": 32, "height": 32, "steps": 2,
          "nfe": 4, "strategy": {"sampler": {"name": "ddim"}}, "batch_size_used": 1,
          "timings": {"denoise": 0.5, "total": 0.75, "queue": 0.125}}
EVENTS = [(1, "job.queued", {"position": 0}), (2, "job.started", {}), (3, "job.progress", {"step": 1, "total": 2}),
          (4, "job.progress", {"step": 2, "total": 2}), (5, "job.completed", {"result": RESULT})]


def sse(events: list[tuple[int, str, dict[str, Any]]]) -> bytes:
    return b"".join(f"id: {i}\nevent: {t}\ndata: {json.dumps(d)}\n\n".encode() for i, t, d in events)


class BrokenStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Sends some bytes, then the connection breaks."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset")


def flaky_events_transport(seen: list[httpx.Request]) -> httpx.MockTransport:
    """The first stream breaks after two events and a heartbeat; the next is refused once (503); later ones
    replay every event from the start, ignoring Last-Event-ID, so the client must drop repeats."""
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-type": "text/event-stream"}
        if len(seen) == 1:
            return httpx.Response(200, headers=headers, stream=BrokenStream(sse(EVENTS[:2]) + b": heartbeat\n\n"))
        if len(seen) == 2:
            return error(503, "unavailable", {"Retry-After": "0.5"})
        return httpx.Response(200, headers=headers, content=sse(EVENTS))

    return httpx.MockTransport(handler)


def test_a_broken_event_stream_resumes_without_repeats() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    with AccelClient("http://sdk.test", backoff_s=0.1, transport=flaky_events_transport(seen),
                     sleep=sleeps.append) as sdk:
        job = sdk.job("job_x")
        events = list(job.events())
        assert [e.id for e in events] == [1, 2, 3, 4, 5] and events[-1].type == "job.completed"
        assert [r.headers.get("Last-Event-ID") for r in seen] == [None, "2", "2"]
        assert sleeps == [0.1, 0.5]  # backoff after the break, then the server's Retry-After


def test_result_long_polls_the_job_object() -> None:
    seen: list[httpx.Request] = []
    completed = next(data for _, kind, data in EVENTS if kind == "job.completed")

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:  # the server's long-poll ran out while the job was still running
            return httpx.Response(200, json={"id": "job_x", "status": "running"})
        return httpx.Response(200, json={"id": "job_x", "status": "succeeded", "result": completed["result"]})

    with AccelClient("http://sdk.test", transport=httpx.MockTransport(handler)) as sdk:
        output = sdk.job("job_x").result(timeout=100)
    assert [(r.url.path, r.url.params.get("wait")) for r in seen] == [("/v1/jobs/job_x", "30.0")] * 2
    assert output.seeds == [3] and output.nfe == 4 and output.images[0].size == (32, 32)
    assert output.timings["queue"] == 0.125 and output.timings["wall"] >= 0 and output.raw is not None


def test_async_event_stream_resumes_too() -> None:
    seen: list[httpx.Request] = []

    async def sleep(seconds: float) -> None:
        pass

    async def main() -> list[int]:
        async with AsyncAccelClient("http://sdk.test", transport=flaky_events_transport(seen), sleep=sleep) as sdk:
            return [event.id async for event in sdk.job("job_x").events()]

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]
    assert [r.headers.get("Last-Event-ID") for r in seen] == [None, "2", "2"]


def test_released_images_raise_images_released() -> None:
    completed = next(data for _, kind, data in EVENTS if kind == "job.completed")
    result = {**completed["result"], "images_released": True,
              "images": [{**im, "b64_json": None} for im in completed["result"]["images"]]}
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, json={"id": "job_r", "status": "succeeded", "result": result}))
    with AccelClient("http://sdk.test", transport=transport) as sdk, pytest.raises(ImagesReleased) as raised:
        sdk.job("job_r").result()
    assert raised.value.job_id == "job_r" and "max_job_image_bytes" in str(raised.value)


def test_failed_jobs_raise_job_failed_with_the_error_type() -> None:
    failed = {"id": "job_f", "status": "failed", "error": {"type": "gpu_oom", "code": "gpu_oom",
                                                          "message": "out of device memory", "param": None}}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=failed))
    with AccelClient("http://sdk.test", transport=transport) as sdk, pytest.raises(JobFailed) as raised:
        sdk.job("job_f").result()
    assert raised.value.type == "gpu_oom" and raised.value.job_id == "job_f" and isinstance(raised.value, AccelError)
    assert "out of device memory" in str(raised.value)

