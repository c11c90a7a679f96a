"""The chat page at `/` in headless Chromium (Debian's package) against a real server on 127.0.0.1.

The browser is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
ended by a NUL byte on file descriptors 3 and 4), so no websocket client is needed. The test types and
clicks as a user would: it sends a turn without the key (the server's 401 message is shown and the turn
is given back), enters the key, sends a greedy turn and a second one with Enter, and checks that each
answer on the page equals the non-streaming API's answer to the very request the page sent (with the
conversation so far kept by the page), that text appears while the server is still generating, that Stop
frees the server's row at once, and saves a screenshot. Skipped when no Chromium is installed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve.test_server import KEY, _checkpoint, _post, serving

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium); "
                                                         "the chat page is tested in a headless browser")
WIDTH, HEIGHT = 1000, 700


# Runs Chromium with the two pipe ends as its fds 3 and 4 (dash, Debian's sh, takes no fd above 9).
ON_FDS_3_AND_4 = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"


def _above_4(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium page, driven over the DevTools protocol on a pipe."""

    def __init__(self, exe: str, profile: Path, log: Path) -> None:
        to_chrome, self._commands = os.pipe()  # Chromium reads commands on fd 3
        self._replies, from_chrome = os.pipe()  # and writes replies and events on fd 4
        to_chrome, from_chrome = _above_4(to_chrome), _above_4(from_chrome)  # so moving them cannot clobber
        args = ["--headless", "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage", "about:blank"]
        if os.geteuid() == 0:
            args.insert(0, "--no-sandbox")  # Chromium refuses to run its sandbox as root (CI containers)
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", ON_FDS_3_AND_4, str(to_chrome), str(from_chrome), exe, *args],
                                         pass_fds=(to_chrome, from_chrome), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id, self.session = b"", 0, None

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            data = os.read(self._replies, 1 << 20)
            if not data:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()})")
            self._buffer += data
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """One command (to the page once attached) and its result; events in between are skipped."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && document.getElementById('send') !== null")

    def js(self, expression: str) -> Any:
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.02)
        return value

    def type(self, selector: str, text: str) -> None:
        """Focus the field, clear it and type `text` as keyboard input; blurring fires its change event."""
        self.js(f"(e => {{ e.focus(); e.value = ''; }})(document.querySelector({json.dumps(selector)}))")
        self.send("Input.insertText", text=text)
        self.js("document.activeElement.blur()")

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        x, y = self.js(f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
                       f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._commands)
        os.close(self._replies)


@contextlib.contextmanager
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(CHROMIUM, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        yield b
    finally:
        b.close()


# The page's requests, recorded so the test can replay the very same body without streaming.
RECORD_REQUESTS = """(() => { window.sent = []; const f = window.fetch;
  window.fetch = (url, options) => { if (options && options.body) window.sent.push(options.body); return f(url, options); };
  return true; })()"""
LAST_ANSWER = "[...document.querySelectorAll('.msg.assistant')].map(e => e.textContent).pop()"


def replay(url: str, sent: str) -> str:
    """The non-streaming API's answer to a request the page sent."""
    body = {k: v for k, v in json.loads(sent).items() if k not in ("stream", "stream_options")}
    status, out = _post(url, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, out
    return out["choices"][0]["message"]["content"]


def test_chat_page_streams_greedy_answers_equal_to_the_api_and_stops(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", 2048)  # greedy "where is the dog" runs 1060 tokens before <|im_end|>
    with serving(ckpt, slots=2, max_queue=4) as (url, sched, _, _), browser(tmp_path) as page:
        page.open(url + "/")
        page.wait("document.getElementById('model').textContent.includes('needs the API key')")

        # No key: the server's 401 (OpenAI's error shape) is shown and the turn is given back.
        page.type("#input", "where is the dog")
        page.click("#send")
        error = page.wait("document.getElementById('error').textContent")
        assert "a Bearer API key is required" in error and "401" in error
        assert page.js("document.querySelectorAll('.msg').length") == 0
        assert page.js("document.getElementById('input').value") == "where is the dog"

        page.type("#api-key", KEY)
        page.wait("document.getElementById('model').textContent === 'model: tiny'")
        assert page.js("sessionStorage.getItem('temper-api-key')") == KEY
        page.type("#temperature", "0")
        page.type("#max-tokens", "12")
        assert page.js(RECORD_REQUESTS)
        page.click("#send")
        page.wait("document.querySelectorAll('.meta').length === 1")
        first = page.js(LAST_ANSWER)
        assert page.js("document.getElementById('error').textContent") == ""
        sent = json.loads(page.js("window.sent.at(-1)"))
        assert sent["messages"] == [{"role": "user", "content": "where is the dog"}]
        assert (sent["stream"], sent["temperature"], sent["max_tokens"]) == (True, 0, 12)
        assert first and first == replay(url, page.js("window.sent.at(-1)"))
        assert "12 tokens" in page.js("document.querySelector('.meta').textContent")

        # A second turn, sent with Enter: the page sends the whole conversation.
        page.js("document.getElementById('input').focus()")
        page.send("Input.insertText", text="and the cat")
        page.press_enter()
        page.wait("document.querySelectorAll('.meta').length === 2")
        sent = page.js("window.sent.at(-1)")
        assert json.loads(sent)["messages"] == [{"role": "user", "content": "where is the dog"},
                                                {"role": "assistant", "content": first},
                                                {"role": "user", "content": "and the cat"}]
        assert page.js(LAST_ANSWER) == replay(url, sent)
        assert page.js("document.querySelectorAll('.msg.user').length") == 2
        shot = tmp_path / "chat_page.png"
        page.screenshot(shot)
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (WIDTH, HEIGHT)
        assert len(png) > 10_000  # text, bubbles and the settings panel, not a blank page

        # New chat, then a long answer: its text shows while the server is still generating; Stop frees the row.
        page.click("#clear")
        assert page.js("document.querySelectorAll('.msg').length") == 0
        page.type("#max-tokens", "1000")
        page.type("#input", "where is the dog")
        before = sched.tokens_generated
        page.click("#send")
        page.wait(f"({LAST_ANSWER} || '').length > 0")
        assert sched.running == 1
        page.click("#stop")
        page.wait("!document.getElementById('send').disabled")
        deadline = time.monotonic() + 10
        while sched.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.running == 0 and sched.queued == 0
        assert sched.tokens_generated - before < 1000
        assert page.js("document.querySelector('.meta').textContent") == "stopped"
        assert page.js("document.getElementById('error').textContent") == ""
