"""Host and Origin checks (server/hosts.py): forged Host headers (DNS rebinding) get 421, pages of other
origins 403, over TestClient and over a real uvicorn with a real WebSocket client; probes answer any Host."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from server_clients import make_settings, running_server

PROMPT = "a red circle"
JOB = {"prompt": PROMPT, "steps": 2, "seed": 0}


def _error(response: Any) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["type"], error["param"]


def test_the_loopback_default_refuses_a_rebound_host_and_serves_the_loopback_names(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, allowed_hosts=None)  # the default, bound to 127.0.0.1
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for forged in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", "10.0.0.7:8000",
                       "localhost:80x"):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/jobs"), ("GET", "/web/"),
                                 ("GET", "/v1/stream/any/mjpeg"), ("GET", "/metrics")):
                response = client.request(method, path, json=JOB if method == "POST" else None,
                                          headers={"Host": forged})
                assert _error(response) == (421, "invalid_host", "Host"), (forged, path)
                assert "allowed_hosts" in response.json()["error"]["message"] and response.headers["X-Request-Id"]
        assert app.state.server.jobs.all() == []  # nothing was queued for a refused Host
        for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
        assert client.get("/web/", headers={"Host": "localhost:8000"}).status_code == 200
        for probe in ("/health/live", "/health/ready"):  # kubelet sends the pod IP as Host
            assert client.get(probe, headers={"Host": "10.0.0.7:8000"}).status_code == 200
        assert 'accel_diffusion_errors_total{type="invalid_host"} 25.0' in client.get("/metrics").text


def test_allowed_hosts_names_and_subdomains_and_the_any_default_off_loopback(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, host="0.0.0.0", allowed_hosts=["gen.example.com", "*.svc.local"])
    with TestClient(create_app(settings)) as client:
        served = [client.get("/v1/models", headers={"Host": h}).status_code
                  for h in ("gen.example.com", "GEN.example.com:443", "accel.default.svc.local:8000", "svc.local",
                            "example.com", "localhost")]
        assert served == [200, 200, 200, 421, 421, 421]
    with TestClient(create_app(make_settings(tiny_models_file, host="0.0.0.0", allowed_hosts=None))) as client:
        assert client.get("/v1/models", headers={"Host": "anything.example"}).status_code == 200


def test_browser_requests_from_other_origins_are_refused(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, allowed_hosts=None, allowed_origins=["https://gen.example.com"],
                             cors_origins=["https://app.example"])
    app = create_app(settings)
    with TestClient(app, base_url="http://localhost:8000") as client:
        refused = {"https://evil.example", "http://localhost:3000", "null", "http://localhost:8000.evil.example",
                   "file://", "https://gen.example.com.evil.example"}
        for origin in sorted(refused):
            response = client.post("/v1/jobs", json=JOB, headers={"Origin": origin})
            assert _error(response) == (403, "forbidden_origin", "Origin"), origin
            assert "allowed_origins" in response.json()["error"]["message"]
        preflight = client.options("/v1/jobs", headers={"Origin": "https://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
        assert app.state.server.jobs.all() == []
        for origin in ("http://localhost:8000", "https://gen.example.com", "https://app.example",
                       "HTTPS://GEN.EXAMPLE.COM/"):
            assert client.post("/v1/jobs", json=JOB, headers={"Origin": origin}).status_code == 202, origin
        assert client.post("/v1/jobs", json=JOB).status_code == 202  # no Origin: not a browser's cross-site call
        # same origin behind a proxy that ends TLS: https page, Host without a port
        assert client.get("/v1/models", headers={"Host": "localhost", "Origin": "https://localhost"}).status_code == 200
        assert client.get("/health/ready", headers={"Origin": "https://evil.example"}).status_code == 200


def _handshake(port: int, host: str, origin: str | None) -> Any:
    """A real WebSocket client's handshake to 127.0.0.1:port, sending ``host`` as its Host."""
    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return connect(f"ws://{host}/v1/stream", sock=sock, origin=origin, open_timeout=30)


def test_the_stream_websocket_refuses_forged_hosts_and_other_origins(tiny_models_file: Path) -> None:
    from websockets.exceptions import InvalidStatus

    app = create_app(make_settings(tiny_models_file, allowed_hosts=None))
    with running_server(app) as (_, _, url):
        port = int(url.rsplit(":", 1)[1])
        refusals = [(f"attacker.example:{port}", None, 421, "invalid_host"),
                    (f"attacker.example:{port}", f"http://attacker.example:{port}", 421, "invalid_host"),
                    (f"127.0.0.1:{port}", "https://evil.example", 403, "forbidden_origin"),
                    (f"localhost:{port}", "http://localhost:3000", 403, "forbidden_origin")]
        for host, origin, status, kind in refusals:
            with pytest.raises(InvalidStatus) as refused:
                _handshake(port, host, origin)
            response = refused.value.response
            assert response.status_code == status, (host, origin)
            assert json.loads(response.body)["error"]["type"] == kind
        assert app.state.server.stream_sessions == 0
        start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}
        for host, origin in ((f"127.0.0.1:{port}", None), (f"localhost:{port}", f"http://localhost:{port}")):
            with _handshake(port, host, origin) as ws:
                ws.send(json.dumps(start))
                assert json.loads(ws.recv())["type"] == "session.started"
