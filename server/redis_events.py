"""One event reader per API process: every request waiting on a job's events (SSE streams, long polls,
synchronous calls) is served by a single blocking XREAD over all the job event streams waited on, instead of one
blocked Redis connection per waiting request.

A waiter on a stream the reader does not watch yet (or from an earlier event than it watches) interrupts the
blocked read by adding an entry to the process's own wake stream (``wake_key``), which the read also watches.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.asyncio

Entries = list[tuple[str, dict[str, str]]]
WAKE_TTL_S = 3600


def event_number(entry_id: str) -> int:
    return int(entry_id.split("-")[1])


class EventHub:
    """Waits on job event streams (entry ids ``0-<n>``) for the requests of one process, with one XREAD."""

    def __init__(self, client: redis.asyncio.Redis, wake_key: str, block_ms: int = 5000) -> None:
        self.client = client
        self.wake_key = wake_key
        self.block_ms = block_ms
        self._waiters: dict[str, list[tuple[int, asyncio.Future[Entries]]]] = {}
        self._watched: dict[str, int] = {}  # what the read in flight asks for: stream -> after
        self._wake_last = "0-0"
        self._task: asyncio.Task[None] | None = None
        self._reading = False  # a read is in flight (blocked in Redis, or about to be)

    @property
    def waiting(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    async def wait(self, key: str, after: int, timeout_s: float) -> Entries:
        """The stream's entries after event number ``after`` once there are some, or [] after ``timeout_s``.
        Raises the Redis error that stopped the reader."""
        future: asyncio.Future[Entries] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, [])
        waiters.append((after, future))
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._read())
            elif self._reading and (key not in self._watched or after < self._watched[key]):  # the read in flight
                # misses it: interrupt it (between reads the reader builds its next one from the waiters)
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16)
                    pipe.expire(self.wake_key, WAKE_TTL_S)
                    await pipe.execute()
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout_s)
            except TimeoutError:
                return []
        finally:
            waiters.remove((after, future))
            if not waiters:
                self._waiters.pop(key, None)

    async def _read(self) -> None:
        while self._waiters:
            self._watched = {key: min(after for after, future in waiters if not future.done())
                             for key, waiters in self._waiters.items() if any(not f.done() for _, f in waiters)}
            if not self._watched:  # all answered, not yet resumed
                await asyncio.sleep(0)
                continue
            streams: dict[Any, Any] = {key: f"0-{after}" for key, after in self._watched.items()}
            streams[self.wake_key] = self._wake_last
            self._reading = True  # set with the streams built, no await between: a later waiter wakes the read
            try:
                reply = await self.client.xread(streams, block=self.block_ms)
            except redis.RedisError as exc:  # each waiter answers 503; the next wait starts a new reader
                for waiters in self._waiters.values():
                    for _, future in waiters:
                        if not future.done():
                            future.set_exception(exc)
                self._watched = {}
                return
            finally:
                self._reading = False
            for key, entries in reply or []:
                if key == self.wake_key:
                    self._wake_last = entries[-1][0]
                    continue
                for after, future in self._waiters.get(key, []):
                    mine = [entry for entry in entries if event_number(entry[0]) > after]
                    if mine and not future.done():
                        future.set_result(mine)
        self._watched = {}
