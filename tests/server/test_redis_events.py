"""The API process's one event reader (EventHub) against a real redis-server: many waiting requests, one blocked
Redis connection; each waiter woken by its own job's events only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from accel_diffusion.server.redis_events import EventHub
from conftest import require_tool
from redis_server import RedisServer


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(require_tool("redis-server"), tmp_path)
    server.start()
    yield server.url
    server.stop()


def test_many_waiters_share_one_blocked_read_and_each_wakes_on_its_own_stream(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    for index in range(20):
        sync.xadd(f"ev:{index}", {"type": "job.queued"}, id="0-1")

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        hub = EventHub(client, "wake:test")
        waits = [asyncio.create_task(hub.wait(f"ev:{index}", 1, 5.0)) for index in range(20)]
        await asyncio.sleep(0.3)
        assert hub.waiting == 20 and sync.info("clients")["blocked_clients"] == 1  # one XREAD for all 20
        sync.xadd("ev:3", {"type": "job.progress"}, id="0-2")
        sync.xadd("ev:3", {"type": "job.completed"}, id="0-3")
        woken = await asyncio.wait_for(waits[3], 2.0)
        assert [(entry_id, fields["type"]) for entry_id, fields in woken] in (
            [("0-2", "job.progress")], [("0-2", "job.progress"), ("0-3", "job.completed")])
        assert not any(task.done() for index, task in enumerate(waits) if index != 3)
        late = await asyncio.wait_for(hub.wait("ev:3", 0, 5.0), 2.0)  # from an earlier event: answered at once
        assert [entry_id for entry_id, _ in late] == ["0-1", "0-2", "0-3"]
        assert await hub.wait("ev:new", 0, 0.2) == []  # nothing came: [] after its timeout
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        assert hub.waiting == 0
        await client.aclose()

    asyncio.run(scenario())
    sync.close()
