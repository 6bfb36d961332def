"""server/access_log.py: uvicorn's access lines recorded on the event loop and written in one batch
``delay_s`` later, in order, in uvicorn's words; ``flush`` writes them at once; nothing is kept when the
access logger would drop the line anyway."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from accel_diffusion.server.access_log import ACCESS_LOGGER, AccessLog
from log_messages import CollectMessages


@pytest.fixture
def written() -> Iterator[CollectMessages]:
    """The lines the access logger writes, at INFO (a handler of its own: uvicorn's configuration, which an
    earlier test may have applied, stops the logger's records from reaching pytest's)."""
    handler, level = CollectMessages(), ACCESS_LOGGER.level
    ACCESS_LOGGER.addHandler(handler)
    ACCESS_LOGGER.setLevel(logging.INFO)
    yield handler
    ACCESS_LOGGER.removeHandler(handler)
    ACCESS_LOGGER.setLevel(level)


def scope(path: str, query: bytes = b"", method: str = "GET") -> dict:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": query, "http_version": "1.1", "client": ("127.0.0.1", 5555)}


def test_lines_are_written_in_one_batch_after_the_delay_in_order(written: CollectMessages) -> None:
    access_log = AccessLog(delay_s=0.05)

    async def run() -> tuple[list[str], list[str]]:
        access_log.record(scope("/v1/models"), 200)
        access_log.record(scope("/v1/images/generations", method="POST"), 400)
        access_log.record(scope("/v1/stream/x/mjpeg", b"x=1&y=two"), 404)
        await asyncio.sleep(0.01)
        before = list(written.messages)
        await asyncio.sleep(0.1)
        return before, list(written.messages)

    before, after = asyncio.run(run())
    assert before == []
    assert after == ['127.0.0.1:5555 - "GET /v1/models HTTP/1.1" 200',
                     '127.0.0.1:5555 - "POST /v1/images/generations HTTP/1.1" 400',
                     '127.0.0.1:5555 - "GET /v1/stream/x/mjpeg?x=1&y=two HTTP/1.1" 404']


def test_flush_writes_at_once_and_a_later_record_starts_a_new_batch(written: CollectMessages) -> None:
    access_log = AccessLog(delay_s=30)

    async def run() -> list[str]:
        access_log.record(scope("/a"), 200)
        access_log.flush()
        first = list(written.messages)
        access_log.record(scope("/b"), 201)
        access_log.flush()
        return first

    assert asyncio.run(run()) == ['127.0.0.1:5555 - "GET /a HTTP/1.1" 200']
    assert written.messages[1:] == ['127.0.0.1:5555 - "GET /b HTTP/1.1" 201']


def test_nothing_is_kept_when_the_logger_drops_info_lines(written: CollectMessages) -> None:
    access_log = AccessLog(delay_s=0.01)

    async def run() -> None:
        access_log.record(scope("/a"), 200)
        await asyncio.sleep(0.05)

    ACCESS_LOGGER.setLevel(logging.WARNING)
    asyncio.run(run())
    assert written.messages == [] and access_log._pending == [] and access_log._flush_handle is None
