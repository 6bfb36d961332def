"""``POST /v1/images/generations`` on the ASGI fast path (server/images_fast_path.py) answers what the FastAPI
route answers, byte for byte where nothing is random: the same app with the fast path taken out is the
reference, request by request (images, errors in the OpenAI shape, their status codes and headers); and a valid
request really is served without the route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from accel_diffusion.server import create_app
from accel_diffusion.server.images_fast_path import (
    PATH,
    ImagesFastPath,
    find_route,
    is_json_content_type,
)
from fastapi.testclient import TestClient
from server_clients import decode, make_settings

PROMPT = "a red circle on a blue background"
KEY = {"Authorization": "Bearer alice-key"}
JSON = {"Content-Type": "application/json"}


def _app(models_file: Path, fast: bool) -> Any:
    app = create_app(make_settings(models_file, api_keys=["alice-key", "bob-key"], max_body_bytes=4096))
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not ImagesFastPath]
    return app


@pytest.fixture(scope="module")
def clients(tiny_models_file: Path) -> Iterator[tuple[TestClient, TestClient]]:
    with TestClient(_app(tiny_models_file, True)) as fast, TestClient(_app(tiny_models_file, False)) as slow:
        yield fast, slow


def _route(client: TestClient) -> Any:
    route = find_route(client.app.routes)
    assert route is not None and route.path == PATH and "POST" in route.methods
    return route


def test_the_fast_path_is_installed_innermost_and_the_reference_has_none(
        clients: tuple[TestClient, TestClient]) -> None:
    fast, slow = clients
    assert fast.app.user_middleware[-1].cls is ImagesFastPath  # the last of the list runs innermost
    assert all(m.cls is not ImagesFastPath for m in slow.app.user_middleware)


def test_a_valid_request_gets_the_routes_images(clients: tuple[TestClient, TestClient]) -> None:
    body = {"prompt": PROMPT, "n": 2, "size": "32x32", "seed": 7, "num_inference_steps": 2, "guidance_scale": 4.0,
            "strategy": {"sampler": "ddim"}}
    answers = [c.post(PATH, json=body, headers={**KEY, "X-Request-Id": "r-1"}) for c in clients]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-request-id"] == "r-1" and answer.headers["content-type"] == "application/json"
    a, b = (answer.json() for answer in answers)
    assert a.keys() == b.keys() and a["seeds"] == b["seeds"] == [7, 8] and a["strategy"] == b["strategy"]
    assert a["usage"]["images"] == b["usage"]["images"] == 2
    assert a["usage"]["nfe_per_image"] == b["usage"]["nfe_per_image"]
    for x, y in zip(a["data"], b["data"], strict=True):
        assert x["seed"] == y["seed"] and x["revised_prompt"] is y["revised_prompt"] is None
        assert np.array_equal(decode(x["b64_json"]), decode(y["b64_json"]))


# (body bytes, headers): every answer that is not random, compared whole
ERROR_CASES = {
    "no_api_key": (b'{"prompt": "a circle"}', JSON),
    "wrong_api_key": (b'{"prompt": "a circle"}', {**JSON, "Authorization": "Bearer mallory"}),
    "not_bearer": (b'{"prompt": "a circle"}', {**JSON, "Authorization": "Basic alice-key"}),
    "invalid_json": (b'{"prompt": ', {**JSON, **KEY}),
    "not_an_object": (b'["a circle"]', {**JSON, **KEY}),
    "too_deep": (b'{"prompt": "a", "strategy": ' + b'{"a": ' * 200 + b"1" + b"}" * 201, {**JSON, **KEY}),
    "validation_error": (b'{"prompt": "a circle", "n": 0}', {**JSON, **KEY}),
    "unknown_field": (b'{"prompt": "a circle", "guidance": 3}', {**JSON, **KEY}),
    "unknown_model": (b'{"prompt": "a circle", "model": "nope"}', {**JSON, **KEY}),
    "bad_sampler": (b'{"prompt": "a circle", "strategy": {"sampler": "nope"}}', {**JSON, **KEY}),
    "bad_size": (b'{"prompt": "a circle", "size": "33x32"}', {**JSON, **KEY}),
    "too_large": (b'{"prompt": "' + b"x" * 5000 + b'"}', {**JSON, **KEY}),
    "charset_json_bad_field": (b'{"prompt": "a circle", "n": -1}', {"Content-Type": "application/json; charset=utf-8",
                                                                    **KEY}),
    "text_plain": (b'{"prompt": "a circle"}', {"Content-Type": "text/plain", **KEY}),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_the_routes_own(clients: tuple[TestClient, TestClient], case: str) -> None:
    content, headers = ERROR_CASES[case]
    answers = [c.post(PATH, content=content, headers=headers) for c in clients]
    fast, slow = answers
    assert fast.status_code == slow.status_code and 400 <= fast.status_code < 500, (fast.text, slow.text)
    assert fast.content == slow.content
    for name in ("content-type", "retry-after", "www-authenticate"):
        assert fast.headers.get(name) == slow.headers.get(name)


def test_a_chunked_body_over_the_limit_is_413_on_both(clients: tuple[TestClient, TestClient]) -> None:
    body = b'{"prompt": "' + b"x" * 5000 + b'"}'
    answers = [c.post(PATH, content=iter([body[:3000], body[3000:]]), headers={**JSON, **KEY}) for c in clients]
    assert "content-length" not in answers[0].request.headers
    assert [a.status_code for a in answers] == [413, 413] and answers[0].content == answers[1].content


def test_a_draining_server_answers_503_with_retry_after_on_both(clients: tuple[TestClient, TestClient]) -> None:
    answers = []
    for client in clients:
        state = client.app.state.server
        state.draining = True
        try:
            answers.append(client.post(PATH, json={"prompt": PROMPT, "steps": 1}, headers=KEY))
        finally:
            state.draining = False
    fast, slow = answers
    assert fast.status_code == slow.status_code == 503 and fast.content == slow.content
    assert fast.headers["retry-after"] == slow.headers["retry-after"] == "5"


def test_a_valid_request_is_served_without_the_route_and_the_rest_go_down_it(
        clients: tuple[TestClient, TestClient]) -> None:
    fast, _ = clients
    route = _route(fast)
    original, calls = route.handle, []

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await original(scope, receive, send)

    route.handle = counted  # what the router calls, on this route
    try:
        ok = fast.post(PATH, json={"prompt": PROMPT, "seed": 1, "steps": 1}, headers=KEY)
        assert ok.status_code == 200 and calls == []
        assert fast.post(PATH, json={"prompt": PROMPT, "n": 0}, headers=KEY).status_code == 400
        assert fast.post(PATH, json={"prompt": PROMPT}).status_code == 401
        assert len(calls) == 2
    finally:
        del route.handle
    metrics = fast.get("/metrics").text  # labelled with the route's path, as the router labels it
    assert f'route="{PATH}"' in metrics


def test_jobs_of_a_key_on_the_fast_path_are_that_keys(clients: tuple[TestClient, TestClient]) -> None:
    fast, _ = clients
    assert fast.post(PATH, json={"prompt": PROMPT, "seed": 2, "steps": 1}, headers=KEY).status_code == 200
    mine = fast.get("/v1/jobs", headers=KEY).json()["data"]
    theirs = fast.get("/v1/jobs", headers={"Authorization": "Bearer bob-key"}).json()["data"]
    assert any(j["status"] == "succeeded" for j in mine) and theirs == []


@pytest.mark.parametrize(("value", "taken"), [
    (b"application/json", True), (b"Application/JSON; charset=utf-8", True), (b" application/json ;x=1", True),
    (None, False), (b"", False), (b"text/plain", False), (b"application/problem+json", False),
    (b"multipart/form-data; boundary=x", False),
])
def test_only_plain_json_bodies_take_the_fast_path(value: bytes | None, taken: bool) -> None:
    assert is_json_content_type(value) is taken
