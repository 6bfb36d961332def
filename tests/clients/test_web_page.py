"""The live img2img page (clients/web) in a real headless Chromium with a fake camera, driven over the
DevTools protocol: processed frames arrive and the readout updates, and after a dropped connection the
page reconnects and the frames go on. A screenshot is kept in
``$TEST_ARTIFACTS_DIR`` (default ``test-artifacts/``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from accel_diffusion.server import create_app
from conftest import require_tool
from server_clients import make_settings, running_server

T = TypeVar("T")


@pytest.fixture(autouse=True)
def chromium() -> str:
    """Debian's chromium: skipped without it, except under CI=true, where it fails (tests/conftest.py)."""
    return require_tool("chromium", "chromium-browser")


class DevTools:
    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        call_id = self.next_id
        await self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]

    async def value(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def poll(self, fields: dict[str, str], done: Any, timeout: float) -> dict[str, Any]:
        """The page's ``fields`` (name -> JS expression), read every 0.25 s until ``done(state)`` or ``timeout``."""
        expression = "({" + ", ".join(f"{name}: {js}" for name, js in fields.items()) + "})"
        state: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = await self.value(expression) or {}
            if done(state):
                break
            await asyncio.sleep(0.25)
        return state


def text(element: str, number: bool = False) -> str:
    return f"{'+' if number else ''}document.getElementById('{element}').textContent"


def start_chromium(profile: Path, camera: str = "allowed") -> tuple[subprocess.Popen, int]:
    """Headless Chromium with a fake camera that pages may use ("allowed"), one whose use is refused (no
    permission prompt to accept: "refused"), or no camera at all ("none")."""
    fake_camera = {"allowed": ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
                   "refused": ["--use-fake-device-for-media-stream"], "none": []}[camera]
    browser = require_tool("chromium", "chromium-browser")
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", *fake_camera,
               "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return process, int(port_file.read_text().splitlines()[0])
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("chromium did not start")


def drive_page(url: str, profile: Path, work: Callable[[DevTools], Awaitable[T]], camera: str = "allowed",
               size: tuple[int, int] | None = None, script: str | None = None) -> T:
    """Open ``url`` in a fresh headless Chromium (user data in ``profile``; ``camera`` as ``start_chromium``), with
    the viewport ``size`` and ``script`` run before the page's own, and return what ``work`` makes of the page;
    the browser is gone afterwards."""
    from websockets.asyncio.client import connect

    browser, port = start_chromium(profile, camera=camera)
    try:
        target = next(p for p in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if p["type"] == "page")

        async def drive() -> T:
            async with connect(target["webSocketDebuggerUrl"], max_size=None) as socket:
                tools = DevTools(socket)
                await tools.call("Page.enable")
                if size is not None:
                    await tools.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                                     deviceScaleFactor=1, mobile=False)
                if script is not None:
                    await tools.call("Page.addScriptToEvaluateOnNewDocument", source=script)
                await tools.call("Page.navigate", url=url)
                return await work(tools)

        return asyncio.run(drive())
    finally:
        browser.kill()
        browser.wait(30)


def test_the_web_page_streams_the_camera_through_the_model(tiny_models_file: Path, tmp_path: Path) -> None:
    async def stream_then_drop(tools: DevTools) -> tuple[dict[str, Any], bytes]:
        state = await tools.poll(
            {"frames": text("frames", True), "fps": text("fps", True), "latency": text("latency"),
             "output": "document.getElementById('output').src",
             "loaded": "document.getElementById('output').naturalWidth", "status": text("status")},
            lambda state: state.get("frames", 0) >= 10 and state.get("loaded"), 90)
        shot = await tools.call("Page.captureScreenshot", format="png")
        # a dropped connection: the page opens a new session and the frames go on
        before = state.get("frames", 0)
        await tools.value("socket.close(4000, 'dropped by the test')")
        after = await tools.poll(
            {"frames": text("frames", True), "reconnects": text("reconnects", True), "status": text("status")},
            lambda after: after.get("frames", 0) >= before + 10 and after.get("reconnects"), 60)
        state["after_reconnect"] = after
        return state, base64.b64decode(shot["data"])

    artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR", "test-artifacts"))
    with running_server(create_app(make_settings(tiny_models_file))) as (_, _, url):
        assert httpx.get(f"{url}/", follow_redirects=True).text.startswith("<!doctype html>")
        state, screenshot = drive_page(f"{url}/web/", tmp_path / "profile", stream_then_drop, size=(900, 720))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "web_page.png").write_bytes(screenshot)
    assert state["status"].startswith("streaming tiny"), state
    assert state["frames"] >= 10 and state["fps"] > 0 and float(state["latency"]) > 0, state
    assert state["output"].startswith("blob:") and state["loaded"] == 32, state  # a processed frame is shown
    after = state["after_reconnect"]
    assert after["reconnects"] == 1 and after["frames"] >= state["frames"] + 10, after
    assert after["status"].startswith("streaming tiny"), after
    assert screenshot.startswith(b"\x89PNG")


@pytest.mark.parametrize(("camera", "problem"), [("none", "no camera found"), ("refused", "camera refused")])
def test_without_a_camera_the_page_streams_a_test_pattern_and_then_a_chosen_file(
        tiny_models_file: Path, tmp_path: Path, camera: str, problem: str) -> None:
    from PIL import Image

    image_file = tmp_path / "shapes input.png"
    Image.new("RGB", (64, 48), (30, 160, 60)).save(image_file)
    reading = {"frames": text("frames", True), "status": text("status"), "note": text("source-note"),
               "caption": text("source-caption"), "source": "document.getElementById('source').value",
               "shown": "['camera', 'pattern', 'still'].filter((id) => !document.getElementById(id).hidden)",
               "loaded": "document.getElementById('output').naturalWidth"}

    async def pattern_then_file(tools: DevTools) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        pattern = await tools.poll(reading, lambda s: s.get("frames", 0) >= 5 and s.get("loaded"), 90)
        shot = await tools.call("Page.captureScreenshot", format="png")
        # the user picks a file (what the file chooser does): its frames replace the pattern's
        document = await tools.call("DOM.getDocument")
        node = await tools.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
        await tools.call("DOM.setFileInputFiles", files=[str(image_file)], nodeId=node["nodeId"])
        before = pattern.get("frames", 0)
        chosen = await tools.poll(reading, lambda s: s.get("source") == "file" and s.get("frames", 0) >= before + 5,
                                  60)
        return pattern, chosen, base64.b64decode(shot["data"])

    with running_server(create_app(make_settings(tiny_models_file))) as (_, _, url):
        pattern, chosen, screenshot = drive_page(f"{url}/web/", tmp_path / "profile", pattern_then_file,
                                                 camera=camera, size=(900, 760))
    artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR", "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / f"web_page_camera_{camera}.png").write_bytes(screenshot)
    assert pattern["frames"] >= 5 and pattern["loaded"] == 32, pattern  # processed frames of the pattern
    assert pattern["status"].startswith("streaming tiny"), pattern
    assert pattern["source"] == "pattern" and pattern["caption"] == "test pattern" and pattern["shown"] == ["pattern"]
    assert pattern["note"].startswith(f"{problem}: streaming a test pattern instead"), pattern
    assert chosen["source"] == "file" and chosen["caption"] == "shapes input.png" and chosen["shown"] == ["still"]
    assert chosen["note"] == "" and chosen["frames"] >= pattern["frames"] + 5, chosen


def test_the_web_page_sends_the_api_key_as_a_websocket_subprotocol(
        tiny_models_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """With API keys, the page takes its key from the URL fragment (never sent to the server) and offers it as
    the subprotocol ``base64url.bearer.<key>``; Chromium accepts the echoed ``accel-diffusion`` and the
    frames flow. The key appears in no log line."""
    async def stream(tools: DevTools) -> dict[str, Any]:
        return await tools.poll({"frames": text("frames", True), "status": text("status"),
                                 "protocol": "socket && socket.protocol"},
                                lambda state: state.get("frames", 0) >= 3, 90)

    key = "page/key+=1"
    app = create_app(make_settings(tiny_models_file, api_keys=[key]))
    with running_server(app, log_level="info") as (_, _, url):
        state = drive_page(f"{url}/web/#api_key={key}", tmp_path / "profile", stream)
    assert state["frames"] >= 3 and state["status"].startswith("streaming tiny"), state
    assert state["protocol"] == "accel-diffusion", state
    log = "".join(capfd.readouterr())
    assert '"WebSocket /v1/stream" [accepted]' in log and key not in log, log


# counts, in the page, the frames sent (binary messages) and answered (the server's seq: frames it took) on its
# socket, and the most frames ever in flight when one is sent
COUNT_FRAMES_IN_FLIGHT = """
window.inFlightSeen = {sent: 0, seqs: [], most: 0};
const NativeWebSocket = window.WebSocket;
window.WebSocket = function (...args) {
  const socket = new NativeWebSocket(...args);
  socket.addEventListener("message", (event) => {   // before the page's onmessage, which sends the next frame
    if (typeof event.data === "string" && JSON.parse(event.data).type === "frame") {
      window.inFlightSeen.seqs.push(JSON.parse(event.data).seq);
    }
  });
  return socket;
};
Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
window.WebSocket.prototype = NativeWebSocket.prototype;
const nativeSend = NativeWebSocket.prototype.send;
NativeWebSocket.prototype.send = function (data) {
  if (typeof data !== "string") {
    const seen = window.inFlightSeen, answered = seen.seqs.length ? seen.seqs[seen.seqs.length - 1] : 0;
    seen.sent += 1;
    seen.most = Math.max(seen.most, seen.sent - answered);
  }
  return nativeSend.call(this, data);
};
"""


def test_the_web_page_keeps_two_frames_in_flight(tiny_models_file: Path, tmp_path: Path) -> None:
    """The page sends the next frame before the previous answer arrives (two in flight: the server runs one
    while it sends the other's answer), never a third; the answers come in order and none is lost."""
    async def stream(tools: DevTools) -> dict[str, Any]:
        return await tools.poll({"frames": text("frames", True), "status": text("status"), "latency": text("latency"),
                                 "seen": "window.inFlightSeen"}, lambda state: state.get("frames", 0) >= 12, 90)

    with running_server(create_app(make_settings(tiny_models_file))) as (_, _, url):
        state = drive_page(f"{url}/web/", tmp_path / "profile", stream, camera="none", script=COUNT_FRAMES_IN_FLIGHT)
    seen = state["seen"]
    assert state["frames"] >= 12 and state["status"].startswith("streaming tiny"), state
    assert seen["most"] == 2, seen  # two in flight, never more
    assert seen["seqs"] == list(range(1, len(seen["seqs"]) + 1)), seen  # in order, every frame answered
    assert seen["sent"] - len(seen["seqs"]) in (1, 2), seen  # the pipeline stays full
    assert 0 < float(state["latency"]) < 5000, state
