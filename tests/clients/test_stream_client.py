"""The SDK's StreamClient and the MJPEG view, against a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from accel_diffusion.clients import AuthenticationError, InvalidRequest, StreamClient, StreamError
from accel_diffusion.server import create_app
from PIL import Image
from server_clients import make_settings, running_server

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def server_url(tiny_models_file: Path) -> Iterator[str]:
    with running_server(create_app(make_settings(tiny_models_file, api_keys=["secret"]))) as (_, _, url):
        yield url


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_stream_client_round_trip_updates_errors_and_stats(server_url: str) -> None:
    async def main() -> None:
        async with StreamClient(server_url, PROMPT, api_key="secret", t_index_list=[32, 45],
                                guidance="rcfg_self", output_format="png") as stream:
            assert stream.session["warmup_frames"] == 1 and stream.session["t_index_list"] == [32, 45]
            await stream.send(frame(0))
            first = await stream.receive()
            assert first.warming_up and first.image is None and first.seq == 1
            await stream.send(frame(1))
            second = await stream.receive()
            assert second.image is not None and second.image.size == (32, 32) and second.latency_ms > 0
            await stream.update(prompt="a white cross on a green background")
            with pytest.raises(InvalidRequest) as bad_update:
                await stream.update(t_index_list=[99])
            assert bad_update.value.param == "t_index_list"
            await stream.send(b"not an image")
            assert await stream.update(guidance_scale=1.5) == [32, 45]  # the frame's error waits for receive
            with pytest.raises(StreamError) as bad_frame:
                await stream.receive()
            assert bad_frame.value.param == "frame"
            await stream.send(Image.fromarray(frame(2)))
            assert (await stream.receive()).seq == 3
            stats = await stream.stats()
            assert stats["processed"] == 3 and stats["nfe"] == 6

    asyncio.run(main())


def test_txt2img_stream_is_driven_by_frame_requests(server_url: str, tiny_models_file: Path) -> None:
    from accel_diffusion.models.registry import ModelRegistry
    from accel_diffusion.stream import StreamSession

    async def main() -> list[np.ndarray]:
        async with StreamClient(server_url, PROMPT, api_key="secret", mode="txt2img", t_index_list=[0, 20, 45],
                                guidance="cfg", guidance_scale=3.0, seed=4, output_format="png") as stream:
            assert stream.session["mode"] == "txt2img" and stream.session["warmup_frames"] == 2
            received = []
            for _ in range(4):
                await stream.request()
                received.append(await stream.receive())
            assert [f.warming_up for f in received] == [True, True, False, False]
            await stream.send(frame(0))  # a txt2img session takes no input frames
            with pytest.raises(StreamError) as refused:
                await stream.receive()
            assert refused.value.param == "frame"
            assert (await stream.stats())["nfe"] == 4 * 2 * 3
            return [np.asarray(f.image) for f in received[2:]]

    outputs = asyncio.run(main())
    model = ModelRegistry.from_file(tiny_models_file).get("tiny")
    library = StreamSession(model, PROMPT, mode="txt2img", t_index_list=[0, 20, 45], guidance="cfg",
                            guidance_scale=3.0, seed=4)
    expected = [library() for _ in range(4)][2:]
    assert all(np.array_equal(a, b) for a, b in zip(outputs, expected, strict=True))


def test_frame_requests_are_for_txt2img_sessions_only(server_url: str) -> None:
    async def main() -> None:
        async with StreamClient(server_url, PROMPT, api_key="secret", t_index_list=[45]) as stream:
            with pytest.raises(InvalidRequest) as refused:
                await stream.request()
            assert refused.value.param == "type"

    asyncio.run(main())


def test_wrong_key_is_refused(server_url: str) -> None:
    async def main() -> None:
        async with StreamClient(server_url, PROMPT, api_key="wrong"):
            pass

    with pytest.raises(AuthenticationError):
        asyncio.run(main())


def test_the_key_travels_in_a_header_never_in_the_url(server_url: str) -> None:
    async def main() -> None:
        async with StreamClient(server_url, PROMPT, api_key="secret", t_index_list=[45], guidance="none") as stream:
            assert stream.url == server_url.replace("http", "ws") + "/v1/stream"  # no ?api_key= to be logged
            assert stream.session["mjpeg_url"] == f"/v1/stream/{stream.session['id']}/mjpeg"

    asyncio.run(main())


def test_mjpeg_view_shows_the_session_output(server_url: str) -> None:
    async def main() -> bytes:
        async with StreamClient(server_url, PROMPT, api_key="secret", t_index_list=[45],
                                guidance="none") as stream:
            url = f"{server_url}{stream.session['mjpeg_url']}?api_key=secret"
            async with httpx.AsyncClient(timeout=30) as http:
                missing = await http.get(f"{server_url}/v1/stream/nope/mjpeg?api_key=secret")
                assert missing.status_code == 404
                async with http.stream("GET", url) as response:
                    assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
                    await stream.send(frame(0))
                    await stream.receive()
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if body.count(b"\xff\xd9") >= 1:  # the end of the first JPEG
                            return body

    body = asyncio.run(main())
    assert body.startswith(b"--frame\r\nContent-Type: image/jpeg\r\n")
    jpeg = body[body.index(b"\r\n\r\n") + 4:]
    assert Image.open(io.BytesIO(jpeg)).size == (32, 32)


def test_one_task_receives_while_another_updates_and_polls(server_url: str) -> None:
    async def main() -> None:
        async with StreamClient(server_url, PROMPT, api_key="secret", t_index_list=[45], guidance="none") as stream:
            async def frames() -> list[int]:
                seqs = []
                for k in range(6):
                    await stream.send(frame(k))
                    seqs.append((await stream.receive()).seq)
                return seqs

            async def controls() -> list[object]:
                replies: list[object] = []
                for k in range(6):
                    replies.append(await stream.stats())
                    replies.append(await stream.update(guidance_scale=1.0 + k / 10))
                return replies

            seqs, replies = await asyncio.gather(frames(), controls())
            assert seqs == [1, 2, 3, 4, 5, 6]
            assert [type(r) for r in replies] == [dict, list] * 6 and all(r == [45] for r in replies[1::2])
            with pytest.raises(InvalidRequest):  # a refused update still answers its own call
                await stream.update(t_index_list=[99])
            assert (await stream.stats())["type"] == "stats"

    asyncio.run(main())
