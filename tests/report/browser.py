"""Open a page in headless Chromium through the DevTools protocol: a full-page screenshot and everything the
page logged (console calls, uncaught exceptions, and the browser's own log: failed loads, CSP violations).

Chromium's ``--screenshot`` flag takes only the viewport and its ``--enable-logging`` output leaves out failed
resource loads, so the tests talk to the browser directly (websocket-client, a dev dependency).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageVisit:
    screenshot: bytes  # PNG of the whole page, not just the viewport
    messages: list[dict] = field(default_factory=list)  # {"source", "level", "text"} for everything logged
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, data: URLs left out

    def errors(self) -> list[dict]:
        return [m for m in self.messages if m["level"] in ("error", "assert", "exception")]


def visit(url: str, width: int = 1280, timeout: float = 60.0, browser: str | None = None) -> PageVisit:
    """Load ``url`` in a fresh headless Chromium profile, wait for the load event, take a full-page screenshot."""
    import websocket  # websocket-client

    browser = browser or find_chromium()
    profile = tempfile.mkdtemp(prefix="cnnkit-chromium-")
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars",
         "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (port := _debugging_port(profile)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{browser} did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout)
        try:
            return _drive(ws, url, width, deadline)
        finally:
            ws.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _debugging_port(profile: str) -> int | None:
    """The DevTools port Chromium writes into its profile once it listens (first line; the file is complete
    when its second line, the browser's websocket path, is there)."""
    try:
        with open(os.path.join(profile, "DevToolsActivePort")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return int(lines[0]) if len(lines) >= 2 else None


def _drive(ws, url: str, width: int, deadline: float) -> PageVisit:
    visit = PageVisit(b"")
    next_id = [0]

    def handle(event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            visit.messages.append({"source": "console", "level": params["type"], "text": text})
        elif method == "Runtime.exceptionThrown":
            visit.messages.append({"source": "javascript", "level": "exception",
                                   "text": params["exceptionDetails"].get("text", "")})
        elif method == "Log.entryAdded":
            entry = params["entry"]
            visit.messages.append({"source": entry["source"], "level": entry["level"], "text": entry["text"]})
        elif method == "Network.requestWillBeSent":
            if not params["request"]["url"].startswith("data:"):
                visit.requests.append(params["request"]["url"])

    def call(method: str, **params) -> dict:
        next_id[0] += 1
        ws.send(json.dumps({"id": next_id[0], "method": method, "params": params}))
        while True:
            message = json.loads(ws.recv())
            if message.get("id") == next_id[0]:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            handle(message)

    def wait_for(event: str) -> None:
        while time.monotonic() < deadline:
            message = json.loads(ws.recv())
            handle(message)
            if message.get("method") == event:
                return
        raise TimeoutError(f"no {event} before the time-out")

    for domain in ("Page", "Runtime", "Log", "Network"):
        call(f"{domain}.enable")
    call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
    call("Page.navigate", url=url)
    wait_for("Page.loadEventFired")
    time.sleep(0.2)  # let late console messages and layout settle
    size = call("Page.getLayoutMetrics")["cssContentSize"]
    shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
    visit.screenshot = base64.b64decode(shot["data"])
    return visit
