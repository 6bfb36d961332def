"""The app behind a real uvicorn on 127.0.0.1: generation over TCP, a client that disconnects from a
synchronous call cancels its job, shutdown lets the running job finish, no API key reaches a log line,
each request has one access line, written after its response, and a connection that sends half a request is
closed after ``request_read_timeout_s``."""

from __future__ import annotations

import base64
import json
import logging
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from accel_diffusion.server import create_app
from accel_diffusion.server.jobs import JobStatus
from server_clients import decode, make_settings, running_server


def test_real_server_generates_and_drains(tiny_models_file: Path) -> None:
    app = create_app(make_settings(tiny_models_file))
    with running_server(app) as (server, thread, base), httpx.Client(base_url=base, timeout=60) as http:
        assert http.get("/health/ready").json()["status"] == "ready"
        response = http.post("/v1/images/generations", json={"prompt": "a cross", "seed": 4, "num_inference_steps": 2})
        assert response.status_code == 200 and response.headers["X-Request-Id"]
        assert decode(response.json()["data"][0]["b64_json"]).shape == (32, 32, 3)
        job_id = http.post("/v1/jobs", json={"prompt": "a cross", "n": 4, "seed": 0, "steps": 150}).json()["id"]
        job = app.state.server.jobs.get(job_id)
        while job.status is JobStatus.QUEUED:
            time.sleep(0.01)
        server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does: drain first
        ready = http.get("/health/ready")
        refused = http.post("/v1/jobs", json={"prompt": "late", "steps": 2})
        assert ready.status_code == 503 and refused.status_code == 503 and refused.headers["Retry-After"]
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # still answering while draining
        thread.join(120)
        assert not thread.is_alive()
    assert job.status is JobStatus.SUCCEEDED and job.step == 150  # the running job finished before exit


def test_disconnecting_client_cancels_its_job(tiny_models_file: Path) -> None:
    """The client sends a synchronous request over a raw socket and closes the connection once its job runs (not
    after a fixed client timeout: on a slow machine a request may still be on its way to the job store then)."""
    app = create_app(make_settings(tiny_models_file))
    with running_server(app) as (_, _, base):
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "a cross", "n": 4, "seed": 0, "num_inference_steps": 150}).encode()
        store = app.state.server.jobs
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                         b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\n\r\n" + body)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(j.status is JobStatus.RUNNING for j in store.all()):
                time.sleep(0.01)
            (job,) = store.all()
            assert job.status is JobStatus.RUNNING
        while time.monotonic() < deadline and not job.status.finished:
            time.sleep(0.02)
        assert job.status is JobStatus.CANCELLED and job.step < 150


def test_a_prompt_that_cannot_be_encoded_is_a_400_and_the_batch_and_connection_go_on(tiny_models_file: Path) -> None:
    """The report of issue #16 over TCP with batching on: a lone surrogate in a prompt is refused at the
    edge, the keep-alive connection stays usable, and the jobs around it complete."""
    app = create_app(make_settings(tiny_models_file, max_batch_size=4, max_batch_wait_ms=300))
    with running_server(app) as (_, _, base), httpx.Client(base_url=base, timeout=60) as http:
        good = [http.post("/v1/jobs", json={"prompt": "a cross", "seed": seed, "steps": 2}) for seed in (1, 2)]
        bad = http.post("/v1/jobs", content=b'{"prompt": "a \\ud800 cross", "seed": 3, "steps": 2}',
                        headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
        listed = http.get("/v1/jobs")  # on the same keep-alive connection
        assert listed.status_code == 200 and len(listed.json()["data"]) == 2
        for response in good:
            job = http.get(f"/v1/jobs/{response.json()['id']}", params={"wait": 30}).json()
            assert job["status"] == "succeeded" and job["result"]["batch_size_used"] == 2


def test_no_api_key_reaches_the_log(tiny_models_file: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """uvicorn writes request URLs in its access log and WebSocket lines: the values of query secrets
    (``?api_key=``, ``token``, ...) are redacted there, whatever the answer, and the SDK, web page and
    subprotocol forms never put the key in a URL."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    key = "sk-live-4f7b9c"
    app = create_app(make_settings(tiny_models_file, api_keys=[key]))
    with running_server(app, log_level="info") as (_, _, base), httpx.Client(base_url=base, timeout=60) as http:
        ws_url = base.replace("http", "ws") + "/v1/stream"
        assert http.get("/v1/stream/nope/mjpeg", params={"api_key": key}).status_code == 404
        assert http.get("/v1/models", params={"token": key, "x": 1, "access_token": key}).status_code == 401
        assert http.get("/web/", params={"api_key": key}).status_code == 200
        with connect(f"{ws_url}?api_key={key}") as ws:  # the old form, kept for compatibility
            ws.send(json.dumps({"type": "stats"}))
            assert json.loads(ws.recv())["type"] == "stats"
        with pytest.raises(InvalidStatus), connect(f"{ws_url}?api_key={key}-wrong"):
            pass
        encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
        with connect(ws_url, subprotocols=["accel-diffusion", f"base64url.bearer.{encoded}"]) as ws:
            assert ws.subprotocol == "accel-diffusion"
    log = "".join(capfd.readouterr())
    assert key not in log and encoded not in log, log
    for line in ('"GET /v1/stream/nope/mjpeg?api_key=[redacted] HTTP/1.1" 404',
                 '"GET /v1/models?token=[redacted]&x=1&access_token=[redacted] HTTP/1.1" 401',
                 '"GET /web/?api_key=[redacted] HTTP/1.1" 200', '"WebSocket /v1/stream?api_key=[redacted]" [accepted]',
                 '"WebSocket /v1/stream?api_key=[redacted]" 403', '"WebSocket /v1/stream" [accepted]'):
        assert line in log, (line, log)


def test_each_request_has_one_access_line_written_after_its_response(tiny_models_file: Path) -> None:
    """The server writes uvicorn's access line itself, off the request path (server/access_log.py): when a
    line is written its answer is already in the client's socket; every status has its one line (a 500 from
    an exception too), in order; the lines still pending at shutdown are written then."""
    app = create_app(make_settings(tiny_models_file))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("an unhandled error")

    client_socket: list[socket.socket] = []
    lines: list[tuple[str, int | None]] = []

    class Probe(logging.Handler):  # what the client has received when the access line is written
        def emit(self, record: logging.LogRecord) -> None:
            received = None
            if client_socket:
                try:
                    received = len(client_socket[0].recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT))
                except BlockingIOError:
                    received = 0
            lines.append((record.getMessage(), received))

    probe = Probe()
    with running_server(app, log_level="info") as (_, _, base), httpx.Client(base_url=base, timeout=60) as http:
        logging.getLogger("uvicorn.access").addHandler(probe)  # after uvicorn configured its loggers
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            client_socket.append(sock)
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            deadline = time.monotonic() + 30
            while not lines and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            client_socket.clear()
        body = {"prompt": "a red square", "num_inference_steps": 1, "seed": 3}
        assert http.post("/v1/images/generations", json=body).status_code == 200
        assert http.get("/nope").status_code == 404
        assert http.post("/v1/images/generations", content=b'{"prompt":', headers={
            "Content-Type": "application/json"}).status_code == 400
        assert http.get("/boom").status_code == 500
        time.sleep(0.3)
        written = len(lines)
        app.state.access_log.delay_s = 600  # from now on only the shutdown writes them
        assert http.get("/health/live").status_code == 200
        time.sleep(0.3)
        assert len(lines) == written
    logging.getLogger("uvicorn.access").removeHandler(probe)
    assert lines[0][0].endswith('"GET /v1/models HTTP/1.1" 200') and lines[0][1] > 0, lines  # the answer came first
    assert [message.split(" - ", 1)[1] for message, _ in lines] == [
        '"GET /v1/models HTTP/1.1" 200', '"POST /v1/images/generations HTTP/1.1" 200', '"GET /nope HTTP/1.1" 404',
        '"POST /v1/images/generations HTTP/1.1" 400', '"GET /boom HTTP/1.1" 500', '"GET /health/live HTTP/1.1" 200']


def _closed_after(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Seconds until the server closed ``sock`` (at most ``limit_s``), and what it sent before."""
    begin, received = time.monotonic(), b""
    sock.settimeout(limit_s)
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return time.monotonic() - begin, received
        received += chunk


def test_half_sent_requests_are_closed_after_the_read_timeout(tiny_models_file: Path) -> None:
    """A connection that sends nothing, half a header, a header trickled a byte at a time, or half a body is
    closed once ``request_read_timeout_s`` has passed (408 while in its headers); a request that arrived
    whole keeps its connection however long the app takes (a 2 s long poll, a WebSocket, keep-alive requests)."""
    from websockets.sync.client import connect

    timeout = 1.0
    app = create_app(make_settings(tiny_models_file, request_read_timeout_s=timeout))
    with running_server(app) as (_, _, base), httpx.Client(base_url=base, timeout=60) as http:
        host, port = base.removeprefix("http://").split(":")
        address = (host, int(port))
        job_id = http.post("/v1/jobs", json={"prompt": "a cross", "n": 4, "seed": 0, "steps": 150}).json()["id"]
        began = time.monotonic()
        polled = http.get(f"/v1/jobs/{job_id}", params={"wait": 2 * timeout})  # the app takes longer than the bound
        assert polled.status_code == 200 and polled.json()["status"] in ("queued", "running")
        assert time.monotonic() - began >= 2 * timeout
        http.post(f"/v1/jobs/{job_id}/cancel")
        with connect(base.replace("http", "ws") + "/v1/stream") as ws:  # a WebSocket outlives the bound
            time.sleep(1.5 * timeout)
            ws.send(json.dumps({"type": "stats"}))
            assert json.loads(ws.recv())["type"] == "stats"

        half_body = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        for sent, expected in [(b"", b"HTTP/1.1 408 "), (b"GET /health/live HTTP/1.1\r\nHost: x\r\n", b"HTTP/1.1 408 "),
                               (half_body, b"")]:
            with socket.create_connection(address) as sock:
                sock.sendall(sent)
                elapsed, received = _closed_after(sock, 10 * timeout)
            assert timeout * 0.9 <= elapsed <= timeout + 2, (sent, elapsed)
            assert received.startswith(expected), (sent, received)
            if expected:
                assert received.endswith(b"request not complete within 1 s"), received

        with socket.create_connection(address) as sock:  # slow loris: a byte every 0.15 s never resets the bound
            sock.settimeout(0.15)
            begin, received = time.monotonic(), b""
            for byte in b"GET /health/live HTTP/1.1\r\nX-Padding: " + b"a" * 400:
                try:
                    sock.send(bytes([byte]))
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue  # still open: the next byte
                except OSError:  # reset after the close
                    break
                if not chunk:
                    break
                received += chunk
            elapsed = time.monotonic() - begin
            assert timeout * 0.9 <= elapsed <= timeout + 2 and received.startswith(b"HTTP/1.1 408 "), elapsed

        with socket.create_connection(address) as sock:  # keep-alive: each request gets its own bound
            for _ in range(3):
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(10)
                assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
                time.sleep(0.6 * timeout)
