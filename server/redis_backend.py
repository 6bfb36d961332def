"""The Redis job queue and store (``queue_backend = "redis"``): what several API and worker processes share.

Keys (``prefix`` = ``redis_prefix``, default ``ad``):

- ``{p}:q:{model}``: a Stream, one entry (``job={id}``) per queued job, consumer group ``workers``. A worker
  claims entries with XREADGROUP, holds them by renewing their lease (XCLAIM of its own entries, JUSTID), and a
  dead worker's entries are reclaimed by another one with XAUTOCLAIM once idle for ``lease_s``.
- ``{p}:job:{id}``: a hash: request, output options, owner, status, attempt, consumer, timestamps, progress.
- ``{p}:ev:{id}``: a Stream of the job's events (``type``, ``attempt``, ``data``) with entry ids ``0-1``, ``0-2``...
  (a counter in the job's hash): the SSE id is that number, as in memory mode, so ``Last-Event-ID`` resumes on
  any replica (XRANGE from just after it) and clients see the same ids whatever the backend.
- ``{p}:res:{id}``: the job's terminal record (status, result, error), set once (SET NX) by the one script that
  finishes a job (``complete``): it checks that the caller still owns the queue entry, so a worker whose lease
  was taken over writes nothing, and a second run's result loses to the first. Exactly-once results on top of
  at-least-once execution.
- ``{p}:cancel:{id}``: a cancel flag; a queued job is cancelled at once, a running one by its worker at its next
  step.

Finished jobs' keys expire after ``job_ttl_s``. Everything runs on Redis 7.0 (Debian 12).
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
from accel_diffusion.server.jobs import OutputOptions, QueueFullError, QuotaExceededError, request_echo
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from accel_diffusion.strategy import GenerationRequest, RequestLimits

GROUP = "workers"
TERMINAL = {"succeeded": "job.completed", "failed": "job.failed", "cancelled": "job.cancelled"}
EVENTS_MAXLEN = 1000

# KEYS: queue, job, events, result, preview. ARGV: group, entry id, consumer, attempt, status, record json, event
# type, event data json, ttl s, completed_at. -1: the caller no longer holds the entry (its lease was taken over:
# nothing is written); 0: the job already has its result (an earlier run's; the entry is acked); 1: written.
# A succeeded job's result supersedes its preview (dropped); a failed or cancelled one keeps its last.
_COMPLETE = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', 0, ARGV[2], ARGV[2], 1)
if #pending == 0 or pending[1][2] ~= ARGV[3] then return -1 end
if tostring(redis.call('HGET', KEYS[2], 'attempt')) ~= ARGV[4] then return -1 end
if not redis.call('SET', KEYS[4], ARGV[6], 'NX', 'EX', ARGV[9]) then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
redis.call('HSET', KEYS[2], 'status', ARGV[5], 'completed_at', ARGV[10])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '0-' .. redis.call('HINCRBY', KEYS[2], 'events', 1),
           'type', ARGV[7], 'attempt', ARGV[4], 'data', ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[9])
redis.call('EXPIRE', KEYS[3], ARGV[9])
if ARGV[5] == 'succeeded' then redis.call('DEL', KEYS[5]) else redis.call('EXPIRE', KEYS[5], ARGV[9]) end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: job, events, preview. ARGV: attempt, event data json, preview json, ttl s. A preview event of the job's
# running attempt; its images replace the previous preview's (only the latest is kept, as in memory mode).
_PREVIEW = """
if tostring(redis.call('HGET', KEYS[1], 'attempt')) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '0-' .. redis.call('HINCRBY', KEYS[1], 'events', 1),
           'type', 'job.preview', 'attempt', ARGV[1], 'data', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return 1
"""

# KEYS: job, events, cancel flag, result, queue, dead letters. ARGV: consumer, started_at, ttl s, cancelled record
# json, group, entry id, max deliveries, failed record json, failed event data json, job id. The attempt that
# starts now (a reclaimed job's attempt goes up by one), or 0 when the job must not run (finished, expired, or
# cancelled: a job cancelled while its dead worker ran it is finished as cancelled here), or -1 when it already
# started max deliveries times and no worker finished it (a poison job: finished as failed, its entry moved to
# the dead letters and acked). The caller acks on 0 and -1. A job that starts: {attempt, its request, output,
# owner, created_at} (no second read).
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or (status ~= 'queued' and status ~= 'running') then return 0 end
local function finish(record, new_status, event_type, data)
  if redis.call('SET', KEYS[4], record, 'NX', 'EX', ARGV[3]) then
    redis.call('HSET', KEYS[1], 'status', new_status, 'completed_at', ARGV[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '0-' .. redis.call('HINCRBY', KEYS[1], 'events', 1),
               'type', event_type, 'attempt', redis.call('HGET', KEYS[1], 'attempt'), 'data', data)
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  finish(ARGV[4], 'cancelled', 'job.cancelled', '{"step": 0}')
  return 0
end
local started = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if started >= tonumber(ARGV[7]) then
  finish(ARGV[8], 'failed', 'job.failed', ARGV[9])
  redis.call('XADD', KEYS[6], '*', 'job', ARGV[10], 'entry', ARGV[6],
             'deliveries', started, 'last_consumer', redis.call('HGET', KEYS[1], 'consumer') or '',
             'failed_at', ARGV[2])
  redis.call('XACK', KEYS[5], ARGV[5], ARGV[6])
  return -1
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'consumer', ARGV[1], 'started_at', ARGV[2], 'step', 0)
return {attempt, redis.call('HMGET', KEYS[1], 'request', 'output', 'owner', 'created_at')}
"""

# KEYS: owner index, queue, job, events. ARGV: job key prefix, group, owner's queued cap, waiting cap, queued event
# data json, then the record's fields and values. Admission and enqueue in one round trip: {1, n} the owner has n
# >= cap jobs queued; {2, n} n >= cap jobs wait in the model's queue; else the record, its job.queued event (id
# 0-1), its queue entry and its place in the owner index are written and {0, entry id} returned. The owner's
# jobs' records are read by name (one Redis, not a cluster).
_ENQUEUE = """
local queued = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('HGET', ARGV[1] .. id, 'status') == 'queued' then queued = queued + 1 end
end
if queued >= tonumber(ARGV[3]) then return {1, queued} end
local last = '0-0'
local info = redis.call('XINFO', 'GROUPS', KEYS[2])
for _, group in ipairs(info) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[2] then last = fields['last-delivered-id'] end
end
local waiting = #redis.call('XRANGE', KEYS[2], '(' .. last, '+', 'COUNT', ARGV[4])
if waiting >= tonumber(ARGV[4]) then return {2, waiting} end
local record = {}
for i = 6, #ARGV do record[#record + 1] = ARGV[i] end
redis.call('HSET', KEYS[3], unpack(record))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 1000, '0-1', 'type', 'job.queued', 'attempt', '0', 'data', ARGV[5])
local entry = redis.call('XADD', KEYS[2], '*', 'job', redis.call('HGET', KEYS[3], 'id'))
redis.call('ZADD', KEYS[1], redis.call('HGET', KEYS[3], 'created_at'), redis.call('HGET', KEYS[3], 'id'))
return {0, entry}
"""

# ARGV: key prefix, job id, now, ttl s, owner's cap, global cap. Retention of finished jobs, as in memory mode: the
# job (if finished) joins its owner's finished jobs ({p}:fin:{owner}, by completion time; {p}:fin:owners counts
# them per owner); expired ones leave; past the owner's cap its oldest are dropped, past the global cap the owner
# keeping the most gives up its oldest (nobody's retention is spent by someone else). A dropped job's keys are
# deleted; returns the dropped ids (their images are released by the caller). Keys by name: one Redis.
_RETAIN = """
local p, cutoff = ARGV[1], tonumber(ARGV[3]) - tonumber(ARGV[4])
local owners, dropped = p .. ':fin:owners', {}
local function fin(o) return p .. ':fin:' .. o end
local function count(o)
  local n = redis.call('ZCARD', fin(o))
  if n == 0 then redis.call('ZREM', owners, o) else redis.call('ZADD', owners, n, o) end
  return n
end
local function drop(o, id)
  redis.call('ZREM', fin(o), id)
  redis.call('ZREM', p .. ':owner:' .. o, id)
  redis.call('DEL', p .. ':job:' .. id, p .. ':ev:' .. id, p .. ':res:' .. id, p .. ':prev:' .. id,
             p .. ':cancel:' .. id)
  dropped[#dropped + 1] = id
end
local job = p .. ':job:' .. ARGV[2]
local status, owner, done = unpack(redis.call('HMGET', job, 'status', 'owner', 'completed_at'))
if not status or status == 'queued' or status == 'running' or not done then return dropped end
if owner == '' then owner = '-' end
redis.call('ZADD', fin(owner), done, ARGV[2])
redis.call('ZREMRANGEBYSCORE', fin(owner), '-inf', cutoff)
local n = count(owner)
while n > tonumber(ARGV[5]) do
  drop(owner, redis.call('ZRANGE', fin(owner), 0, 0)[1])
  n = count(owner)
end
local total = 0
local counts = redis.call('ZRANGE', owners, 0, -1, 'WITHSCORES')
for i = 2, #counts, 2 do total = total + tonumber(counts[i]) end
while total > tonumber(ARGV[6]) do
  local most = redis.call('ZREVRANGE', owners, 0, 0)[1]
  local before = tonumber(redis.call('ZSCORE', owners, most))
  if redis.call('ZREMRANGEBYSCORE', fin(most), '-inf', cutoff) == 0 then
    local oldest = redis.call('ZRANGE', fin(most), 0, 0)[1]
    if oldest then drop(most, oldest) end
  end
  total = total - before + count(most)
end
return dropped
"""

# KEYS: job, events. ARGV: attempt, type, data json, step, total. Appends the event of the job's current attempt
# only (a worker whose job was reclaimed by another adds nothing): 1 appended, 0 not.
_EMIT = """
if tostring(redis.call('HGET', KEYS[1], 'attempt')) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[4], 'total', ARGV[5]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '0-' .. redis.call('HINCRBY', KEYS[1], 'events', 1),
           'type', ARGV[2], 'attempt', ARGV[1], 'data', ARGV[3])
return 1
"""

# KEYS: job, events, cancel flag, result. ARGV: ttl s, completed_at, record json. Sets the flag; a queued job
# is finished as cancelled now (1); a running one is left to its worker (0); a finished one is unchanged (-1).
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'queued' and status ~= 'running' then return -1 end
redis.call('SET', KEYS[3], '1', 'EX', ARGV[1])
if status == 'running' then return 0 end
if not redis.call('SET', KEYS[4], ARGV[3], 'NX', 'EX', ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'completed_at', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '0-' .. redis.call('HINCRBY', KEYS[1], 'events', 1),
           'type', 'job.cancelled', 'attempt', '0', 'data', '{"step": 0}')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""


# KEYS: queue. ARGV: group, consumer, entry ids. Renews the lease of the entries the consumer still holds and
# returns them (a plain XCLAIM would take back an entry another worker reclaimed meanwhile).
_RENEW = """
local kept = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', 0, ARGV[i], ARGV[i], 1)
  if #pending > 0 and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""


@dataclass(frozen=True)
class QueueEvent:
    """One event of a job as the API streams it: ``id`` increases by one per event of the job, starting at 1,
    as in memory mode (the SSE id; entry ``0-<id>`` of the job's event stream)."""

    id: int
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class ClaimedJob:
    """A queue entry a worker holds: the job to run and the attempt it runs as."""

    entry_id: str
    model: str
    job_id: str
    request: GenerationRequest
    output: OutputOptions
    owner: str | None
    created_at: float
    attempt: int


@dataclass(frozen=True)
class QueueStats:
    """One model's queue: jobs not yet claimed (``waiting``), claimed and unfinished (``pending``), and the age
    of the oldest waiting job in seconds (0 when none waits)."""

    waiting: int
    pending: int
    oldest_age_s: float

    @property
    def depth(self) -> int:
        return self.waiting + self.pending


def dump_request(request: GenerationRequest) -> str:
    """The request as JSON (an init image as base64 PNG)."""
    data = request.model_dump(mode="json", exclude={"init_image"}, exclude_none=True)
    if request.init_image is not None:
        buffer = io.BytesIO()
        request.init_image.save(buffer, format="PNG")
        data["init_image"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return json.dumps(data)


def load_request(text: str, limits: RequestLimits) -> GenerationRequest:
    data = json.loads(text)
    if "init_image" in data:
        data["init_image"] = base64.b64decode(data["init_image"])
    return GenerationRequest.model_validate(data, context={"limits": limits})


class RedisJobQueue:
    """The job queue, job records, events, cancel flags and results of every process on one Redis.

    ``lease_s``: how long a claimed job stays its worker's without a renewal (workers renew every third of it;
    past it another worker reclaims the job). ``ttl_s``: how long a finished job's keys are kept. Finished jobs
    hold at most ``max_image_bytes`` base64 characters of images in all and ``key_max_image_bytes`` per owner:
    past them the oldest jobs' images are released (``images_released``), the owner holding the most first.
    Finished jobs are kept up to ``key_max_finished`` per owner and ``max_finished`` in all (``retain``).
    ``max_deliveries``: how many times a job is started before it is given up (each of its workers died or lost
    its lease before finishing it): its record ends failed (``worker_lost``) and its queue entry moves to the dead
    letters (``dead_letter_key``), never delivered again.
    """

    def __init__(self, url: str, prefix: str = "ad", lease_s: float = 30.0, ttl_s: float = 3600.0,
                 limits: RequestLimits | None = None, max_image_bytes: int | None = None,
                 key_max_image_bytes: int | None = None, max_deliveries: int = 3, max_finished: int = 1 << 30,
                 key_max_finished: int = 1 << 30) -> None:
        # socket_timeout above the longest BLOCK used (claim): redis-py's default 5 s would retry a long BLOCK;
        # few, short retries: while Redis is down a request answers 503 in well under a second
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=2,
                                          health_check_interval=10,
                                          retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 3))
        self.prefix = prefix
        self.lease_ms = max(1, round(lease_s * 1000))
        self.ttl_s = max(1, round(ttl_s))
        self.limits = limits or RequestLimits()
        self.max_image_bytes = max_image_bytes
        self.key_max_image_bytes = key_max_image_bytes
        self.max_deliveries = max_deliveries
        self.max_finished = max_finished
        self.key_max_finished = key_max_finished
        self._complete = self.redis.register_script(_COMPLETE)
        self._enqueue = self.redis.register_script(_ENQUEUE)
        self._retain = self.redis.register_script(_RETAIN)
        self._start = self.redis.register_script(_START)
        self._emit = self.redis.register_script(_EMIT)
        self._cancel = self.redis.register_script(_CANCEL)
        self._renew = self.redis.register_script(_RENEW)
        self._preview = self.redis.register_script(_PREVIEW)
        self._groups: set[str] = set()

    def close(self) -> None:
        self.redis.close()

    # ---- keys --------------------------------------------------------------------------------

    def queue_key(self, model: str) -> str:
        return f"{self.prefix}:q:{model}"

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    job_key = _job

    def result_key(self, job_id: str) -> str:
        return self._result(job_id)

    def _events(self, job_id: str) -> str:
        return f"{self.prefix}:ev:{job_id}"

    def _result(self, job_id: str) -> str:
        return f"{self.prefix}:res:{job_id}"

    def _owned(self, owner: str | None) -> str:
        return f"{self.prefix}:owner:{owner or '-'}"

    def _preview_key(self, job_id: str) -> str:
        return f"{self.prefix}:prev:{job_id}"

    def _cancel_flag(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def dead_letter_key(self, model: str) -> str:
        """The model's dead letters: a Stream, one entry (``job``, ``entry``, ``deliveries``, ``last_consumer``,
        ``failed_at``) per job given up after ``max_deliveries`` starts."""
        return f"{self.prefix}:dead:{model}"

    def ensure_group(self, model: str) -> None:
        """Create the model's queue and its consumer group (from the start: jobs queued before it are seen)."""
        if model in self._groups:
            return
        try:
            self.redis.xgroup_create(self.queue_key(model), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(model)

    # ---- API side ----------------------------------------------------------------------------

    def enqueue(self, job_id: str, request: GenerationRequest, output: OutputOptions, owner: str | None,
                created_at: float | None = None) -> str:
        """Record and queue a job (one script: its record, its ``job.queued`` event, its queue entry)."""
        return self.admit(job_id, request, output, owner, created_at=created_at)[1]

    def admit(self, job_id: str, request: GenerationRequest, output: OutputOptions, owner: str | None,
              key_max_queued: int = 1 << 30, queue_max: int = 1 << 30, retry_after_s: int = 2,
              created_at: float | None = None) -> tuple[dict[str, str], str]:
        """Queue a job if ``owner`` has fewer than ``key_max_queued`` jobs queued and fewer than ``queue_max`` wait
        in the model's queue, in one round trip: its record (as ``get`` reads it) and queue entry id. Raises
        QuotaExceededError (``key_max_queued_jobs``) or QueueFullError past them."""
        self.ensure_group(request.model)
        created_at = time.time() if created_at is None else created_at
        record = {"id": job_id, "model": request.model, "owner": owner or "", "status": "queued",
                  "request": dump_request(request), "echo": json.dumps(request_echo(request, output)),
                  "output": json.dumps(asdict(output)), "created_at": repr(created_at), "attempt": "0", "events": "1",
                  "step": "0", "total": str(request.steps or 0)}
        code, value = self._enqueue(
            keys=[self._owned(owner), self.queue_key(request.model), self._job(job_id), self._events(job_id)],
            args=[self._job(""), GROUP, key_max_queued, queue_max, json.dumps({"position": None}),
                  *[item for pair in record.items() for item in pair]])
        if code == 1:
            raise QuotaExceededError("key_max_queued_jobs", key_max_queued, "jobs queued for this API key",
                                     retry_after_s)
        if code == 2:
            raise QueueFullError(queue_max, retry_after_s)
        return record, str(value)

    def jobs_of(self, owner: str | None) -> list[dict[str, str]]:
        """The records of ``owner``'s jobs still kept, oldest first (expired ones leave the owner's index)."""
        index = self._owned(owner)
        job_ids = self.redis.zrange(index, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self._job(job_id))
        records = pipe.execute() if job_ids else []
        gone = [job_id for job_id, record in zip(job_ids, records, strict=True) if not record]
        if gone:
            self.redis.zrem(index, *gone)
        return [record for record in records if record]

    def progress_mark(self, job_id: str) -> tuple[str | None, int]:
        """The job's status and its number of events so far (the id of its last one)."""
        status, events = self.redis.hmget(self._job(job_id), ["status", "events"])
        return status, int(events or 0)

    def events_key(self, job_id: str) -> str:
        return self._events(job_id)

    def status(self, job_id: str) -> str | None:
        return self.redis.hget(self._job(job_id), "status")

    def get(self, job_id: str) -> dict[str, str] | None:
        """The job's record, or None (unknown or expired)."""
        return self.redis.hgetall(self._job(job_id)) or None

    def public(self, record: dict[str, str], include_result: bool = True,
               terminal: str | None = None) -> dict[str, Any]:
        """The job object of the API (as ``Job.public``) from its record (and its terminal record, read here
        unless given: "" for none)."""
        if terminal is None and record["status"] not in ("queued", "running"):
            terminal = self.redis.get(self._result(record["id"]))
        final = json.loads(terminal) if terminal and record["status"] not in ("queued", "running") else {}
        total = int(record.get("total") or 0) or None
        step = int(record.get("step") or 0)
        return {
            "id": record["id"], "object": "job", "status": record["status"], "queue_position": None,
            "created_at": float(record["created_at"]),
            "started_at": float(record["started_at"]) if record.get("started_at") else None,
            "completed_at": float(record["completed_at"]) if record.get("completed_at") else None,
            "progress": {"step": step, "total": total, "fraction": step / total if total else 0.0},
            "request": json.loads(record["echo"]),
            "result": final.get("result") if include_result else None,
            "error": final.get("error"),
        }

    def owner(self, record: dict[str, str]) -> str | None:
        return record.get("owner") or None

    def events_after(self, job_id: str, last_id: int = 0, count: int | None = None) -> list[QueueEvent]:
        """The job's events after ``last_id`` (an SSE id; 0: from the first). The terminal event of a succeeded
        job carries its result, read from the result record; the latest preview its images (if the job has not
        succeeded), earlier ones are marked superseded."""
        start = f"(0-{last_id}" if last_id else "-"
        events = []
        preview: dict[str, Any] | None = None
        for entry_id, fields in self.redis.xrange(self._events(job_id), start, "+", count=count):
            data = json.loads(fields["data"])
            if fields["type"] == "job.completed":
                final = json.loads(self.redis.get(self._result(job_id)) or "{}")
                data = {"result": final.get("result")}
            elif fields["type"] == "job.preview":  # the latest preview's images; earlier ones are superseded
                if preview is None:
                    preview = json.loads(self.redis.get(self._preview_key(job_id)) or "{}")
                data = ({**data, "b64_json": preview["b64_json"]} if preview.get("step") == data["step"]
                        else {"step": data["step"], "superseded": True})
            events.append(QueueEvent(int(entry_id.split("-")[1]), fields["type"], data))
        return events

    def cancel(self, job_id: str) -> int:
        """Cancel a job: 1 a queued job, cancelled now; 0 a running one, stopped by its worker at its next step;
        -1 finished or unknown (nothing changes)."""
        record = json.dumps({"status": "cancelled", "result": None, "error": None})
        done = int(self._cancel(keys=[self._job(job_id), self._events(job_id), self._cancel_flag(job_id),
                                      self._result(job_id)], args=[self.ttl_s, repr(time.time()), record]))
        if done == 1:
            self.retain(job_id)
        return done

    def stats(self, model: str) -> QueueStats:
        """The model's queue depth and oldest waiting job's age, the same from every process."""
        self.ensure_group(model)
        key = self.queue_key(model)
        group = next(g for g in self.redis.xinfo_groups(key) if g["name"] == GROUP)
        pending = int(group["pending"])
        waiting = group.get("lag")
        last = group["last-delivered-id"]
        if waiting is None:  # lag unknown (entries deleted): count the entries after the last delivered
            waiting = len(self.redis.xrange(key, f"({last}", "+"))
        oldest_age = 0.0
        if waiting:
            first = self.redis.xrange(key, f"({last}", "+", count=1)
            if first:
                oldest_age = max(0.0, time.time() - int(first[0][0].split("-")[0]) / 1000)
        return QueueStats(int(waiting), pending, oldest_age)

    def trim(self, model: str) -> int:
        """Drop the queue entries before the oldest one still pending or undelivered (finished jobs' entries); the
        backlog (``lag``) stays countable, as only delivered entries go. Returns how many were dropped."""
        self.ensure_group(model)
        key = self.queue_key(model)
        oldest_pending = self.redis.xpending(key, GROUP)["min"]
        group = next(g for g in self.redis.xinfo_groups(key) if g["name"] == GROUP)
        keep_from = oldest_pending or group["last-delivered-id"]
        if keep_from in (None, "0-0"):
            return 0
        return int(self.redis.xtrim(key, minid=keep_from, approximate=False))

    def retain(self, job_id: str) -> list[str]:
        """Count a just-finished job among its owner's finished jobs and apply the retention caps (see
        ``_RETAIN``); idempotent. Returns the ids of the jobs dropped (their images released)."""
        dropped = list(self._retain(args=[self.prefix, job_id, repr(time.time()), self.ttl_s, self.key_max_finished,
                                          self.max_finished]))
        for dropped_id in dropped:
            self.release_images(dropped_id)
        return dropped

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # ---- worker side -------------------------------------------------------------------------

    def claim(self, models: list[str], consumer: str, count: int, block_ms: int = 1000) -> list[ClaimedJob]:
        """Up to ``count`` jobs for ``consumer``: first ones whose worker's lease ran out (reclaimed), else new
        ones (waiting up to ``block_ms``). Jobs that must not run (cancelled while queued) are acked and skipped."""
        for model in models:
            self.ensure_group(model)
        claimed: list[tuple[str, str, str]] = []
        for model in models:
            if len(claimed) >= count:
                break
            reply = self.redis.execute_command("XAUTOCLAIM", self.queue_key(model), GROUP, consumer, self.lease_ms,
                                               "0-0", "COUNT", count - len(claimed))
            for entry_id, fields in reply[1]:
                claimed.append((model, entry_id, (fields or {}).get("job", "")))
            if len(reply) > 2 and reply[2]:  # entries deleted from the stream: nothing to run
                self.redis.xack(self.queue_key(model), GROUP, *reply[2])
        if not claimed:
            reply = self.redis.xreadgroup(GROUP, consumer, {self.queue_key(m): ">" for m in models}, count=count,
                                          block=block_ms)
            for key, entries in reply or []:
                model = key.removeprefix(f"{self.prefix}:q:")
                for entry_id, fields in entries:
                    claimed.append((model, entry_id, fields.get("job", "")))
        jobs = []
        for model, entry_id, job_id in claimed:
            job = self._start_claimed(model, entry_id, job_id, consumer)
            if job is not None:
                jobs.append(job)
        return jobs

    def _start_claimed(self, model: str, entry_id: str, job_id: str, consumer: str) -> ClaimedJob | None:
        cancelled = json.dumps({"status": "cancelled", "result": None, "error": None})
        error = {"type": "worker_lost", "code": "worker_lost", "param": None,
                 "message": f"the job was started {self.max_deliveries} times (max_deliveries) and each time its "
                            "worker died or lost its lease before finishing it; it is not run again (it may crash "
                            "the worker: try fewer steps, a smaller size or fewer images)"}
        failed = json.dumps({"status": "failed", "result": None, "error": error})
        started = self._start(
            keys=[self._job(job_id), self._events(job_id), self._cancel_flag(job_id), self._result(job_id),
                  self.queue_key(model), self.dead_letter_key(model)],
            args=[consumer, repr(time.time()), self.ttl_s, cancelled, GROUP, entry_id, self.max_deliveries, failed,
                  json.dumps({"error": error}), job_id]) if job_id else 0
        if not isinstance(started, list):
            self.redis.xack(self.queue_key(model), GROUP, entry_id)
            if job_id:  # finished here (cancelled, or given up) or earlier: retained once either way
                self.retain(job_id)
            return None
        attempt, (request, output, owner, created_at) = started
        return ClaimedJob(entry_id, model, job_id, load_request(request, self.limits),
                          OutputOptions(**json.loads(output)), owner or None, float(created_at), int(attempt))

    def renew(self, model: str, consumer: str, entry_ids: list[str]) -> list[str]:
        """Renew the lease of ``consumer``'s entries; returns those it still holds (a lost one was reclaimed)."""
        if not entry_ids:
            return []
        return list(self._renew(keys=[self.queue_key(model)], args=[GROUP, consumer, *entry_ids]))

    def emit(self, job: ClaimedJob, type_: str, data: dict[str, Any], step: int | None = None,
             total: int | None = None, client: redis.client.Pipeline | None = None) -> bool:
        """Append an event of the job's running attempt (False: the job is no longer this attempt's). With
        ``client`` (a pipeline) it is queued there, sent with the pipeline's other commands."""
        return bool(self._emit(keys=[self._job(job.job_id), self._events(job.job_id)],
                               args=[job.attempt, type_, json.dumps(data), "" if step is None else step,
                                     "" if total is None else total], client=client))

    def emit_preview(self, job: ClaimedJob, data: dict[str, Any], client: redis.client.Pipeline | None = None) -> bool:
        """A ``job.preview`` event (``step``, ``output_format``, ``b64_json``) of the job's running attempt; its
        images are kept for the latest preview only. ``client``: as in ``emit``."""
        event = {"step": data["step"], "output_format": data.get("output_format")}
        preview = {"step": data["step"], "b64_json": data.get("b64_json") or []}
        return bool(self._preview(keys=[self._job(job.job_id), self._events(job.job_id), self._preview_key(job.job_id)],
                                  args=[job.attempt, json.dumps(event), json.dumps(preview), self.ttl_s],
                                  client=client))

    def complete(self, job: ClaimedJob, consumer: str, status: str, result: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None, step: int = 0) -> int:
        """Finish the job once (see the module doc): 1 written, 0 it already had a result, -1 no longer ours."""
        record = json.dumps({"status": status, "result": result, "error": error})
        data = {"error": error} if status == "failed" else {"step": step} if status == "cancelled" else {}
        return int(self._complete(
            keys=[self.queue_key(job.model), self._job(job.job_id), self._events(job.job_id), self._result(job.job_id),
                  self._preview_key(job.job_id)],
            args=[GROUP, job.entry_id, consumer, job.attempt, status, record, TERMINAL[status], json.dumps(data),
                  self.ttl_s, repr(time.time())]))

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        """Which of the jobs have a cancel flag."""
        if not job_ids:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self._cancel_flag(job_id))
        return {job_id for job_id, flagged in zip(job_ids, pipe.execute(), strict=True) if flagged}

    # ---- images held by finished jobs --------------------------------------------------------

    def _images(self, what: str) -> str:
        return f"{self.prefix}:img:{what}"

    def hold_images(self, job_id: str, owner: str | None, nbytes: int) -> None:
        """Count a just-finished job's images (once: after its completion was written), then apply the caps."""
        if nbytes <= 0:
            return
        who = owner or "-"
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._images("bytes"), job_id, nbytes)
        pipe.hset(self._images("owner"), job_id, who)
        pipe.zadd(self._images("age"), {job_id: time.time()})
        pipe.zadd(self._images(f"age:{who}"), {job_id: time.time()})
        pipe.zincrby(self._images("owners"), nbytes, who)
        pipe.execute()
        self.apply_image_caps(who)

    def release_images(self, job_id: str) -> bool:
        """Drop a finished job's images (its record stays, marked ``images_released``): once a synchronous call
        has returned them, or past a cap. False if it held none."""
        nbytes, who = self.redis.hget(self._images("bytes"), job_id), self.redis.hget(self._images("owner"), job_id)
        if nbytes is None or not self.redis.hdel(self._images("bytes"), job_id):  # someone else released it
            return False
        who = who or "-"
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self._images("owner"), job_id)
        pipe.zrem(self._images("age"), job_id)
        pipe.zrem(self._images(f"age:{who}"), job_id)
        pipe.zincrby(self._images("owners"), -int(nbytes), who)
        pipe.zremrangebyscore(self._images("owners"), "-inf", 0)
        pipe.execute()
        text = self.redis.get(self._result(job_id))
        if text:
            record = json.loads(text)
            result = record.get("result") or {}
            if "images" in result:
                result["images"] = [{**im, "b64_json": None} for im in result["images"]]
                result["images_released"] = True
                self.redis.set(self._result(job_id), json.dumps(record), xx=True, keepttl=True)
        return True

    def held_image_bytes(self, owner: str | None = None) -> int:
        """Base64 characters held by finished jobs: ``owner``'s, or all."""
        if owner is not None:
            return int(self.redis.zscore(self._images("owners"), owner or "-") or 0)
        return int(sum(score for _, score in self.redis.zrange(self._images("owners"), 0, -1, withscores=True)))

    def apply_image_caps(self, owner: str) -> None:
        """Forget expired jobs' images, then release the oldest past the per-owner and the global cap."""
        for job_id in self.redis.zrangebyscore(self._images("age"), "-inf", time.time() - self.ttl_s):
            self.release_images(job_id)
        if self.key_max_image_bytes is not None:
            while self.held_image_bytes(owner) > self.key_max_image_bytes:
                oldest = self.redis.zrange(self._images(f"age:{owner}"), 0, 0)
                if not oldest:
                    break
                self.release_images(oldest[0])
        while self.max_image_bytes is not None and self.held_image_bytes() > self.max_image_bytes:
            most = self.redis.zrevrange(self._images("owners"), 0, 0)  # the owner holding the most gives some up
            oldest = self.redis.zrange(self._images(f"age:{most[0]}"), 0, 0) if most else []
            if not oldest:
                break
            self.release_images(oldest[0])
