"""The report renders in a real browser: headless Chromium loads report.html from disk.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
the browser reads commands on fd 3 and writes replies and events on fd 4, as JSON
messages ended by a NUL byte), so no extra package is needed. The test reads every
``<img>`` element's decoded size, collects console errors, uncaught exceptions and
browser log errors (a blocked or failed load is one), and takes a screenshot. A control
page with a broken image, a console error and a network request checks that the harness
sees each of those.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.report import write_report
from gradguard.testing import FaultInjector

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium binary on PATH (Debian package 'chromium', which .ci/run installs)",
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,4000",
    "--remote-debugging-pipe",
)
IMAGES_JS = (
    "JSON.stringify(Array.from(document.images, i => "
    "({id: i.id, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"
)


class Chromium:
    """A headless Chromium and one page, over the DevTools protocol on fds 3 and 4."""

    def __init__(self, binary: str, profile: Path, timeout: float = 20.0) -> None:
        self.deadline = time.monotonic() + timeout
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def wire() -> None:  # in the child: the protocol's fixed fds 3 and 4
            read = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
            write = fcntl.fcntl(replies_write, fcntl.F_DUPFD, 10)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire,
            close_fds=False,  # our pipes are close-on-exec; only fds 3 and 4 are inherited
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(replies_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=True)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=1280,
            height=4000,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def send(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read_message())

    def settle(self, seconds: float) -> None:
        """Collect events for a little while (late errors)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if select.select([self._replies], [], [], left)[0]:
                self.events.append(self._read_message())

    def load(self, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
        """Open a file; return its images (id, complete, natural size) and its errors."""
        self.events = []
        self.send("Page.navigate", session=True, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        self.settle(0.3)
        value = self.send(
            "Runtime.evaluate", session=True, expression=IMAGES_JS, returnByValue=True
        )
        return json.loads(value["result"]["value"]), errors_in(self.events)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close")  # the pipe may close before the reply comes
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


def errors_in(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors among DevTools events."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value")) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append("log: " + params["entry"]["text"])
    return found


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    assert BROWSER is not None
    chromium = Chromium(BROWSER, tmp_path / "profile")
    yield chromium
    chromium.close()


def faulty_run(run_dir: Path) -> Path:
    """A real guarded run: NaN and Inf gradients (skipped), a loss spike (rolled back)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    injector = FaultInjector(model, optimizer, at={30: "nan", 75: "inf"}, parameter="2.weight")
    recovery = gg.Rollback(every=20, cooldown=15)
    with gg.Guard(
        model, optimizer, clip=gg.NormClip(1.0), recovery=recovery, log_every=10, run_dir=run_dir
    ) as guard:
        for i in range(1, 151):
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(i))
            with injector.step():
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :1]) + x[:, 1:2])
                loss = loss * (1000 if i == 101 else 1)  # a bad batch at step 101
                loss.backward()
                guard.step(loss)
    return run_dir


def test_report_renders_in_chromium(browser: Chromium, tmp_path: Path) -> None:
    report = write_report(faulty_run(tmp_path / "run"))
    images, errors = browser.load(report)
    assert errors == []
    assert [i["id"] for i in images] == [
        "img-loss", "img-grad_norm", "img-lr", "img-heatmap", "img-update_ratio", "img-layer_bars"
    ]  # fmt: skip
    for image in images:
        assert image["complete"], image
        assert image["width"] > 800, image  # decoded: a broken image has a natural width of 0
        assert image["height"] > 200, image
    shot = tmp_path / "report.png"
    browser.screenshot(shot)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels[..., :3].std() > 0.05  # not a blank page


def test_the_harness_sees_broken_images_errors_and_network(
    browser: Chromium, tmp_path: Path
) -> None:
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, np.eye(8), format="png")
    good = base64.b64encode(buffer.getvalue())
    page = tmp_path / "control.html"
    page.write_text(
        f'<html><body><img id="good" src="data:image/png;base64,{good.decode()}">'
        '<img id="broken" src="data:image/png;base64,AAAA">'
        '<script>console.error("boom")</script></body></html>'
    )
    images, errors = browser.load(page)
    assert [(i["id"], i["width"] > 0) for i in images] == [("good", True), ("broken", False)]
    assert "console: boom" in errors
    # the report's Content-Security-Policy refuses the network, and the refusal is an error
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    page.write_text(
        f'<html><head><meta http-equiv="Content-Security-Policy" content="{csp}"></head>'
        '<body><img id="remote" src="https://example.invalid/x.png"></body></html>'
    )
    images, errors = browser.load(page)
    assert images[0]["width"] == 0
    assert any("Content Security Policy" in e for e in errors), errors
