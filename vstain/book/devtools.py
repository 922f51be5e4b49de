"""A headless Chromium driven through the DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON messages), so only the standard library is needed: find the
browser (:func:`find_chromium`), start it and send commands (:class:`DevTools`).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
]
WINDOW = (1280, 2000)

class ChromiumNotFound(FileNotFoundError):
    pass


def find_chromium(explicit: str | None = None) -> str:
    for cand in (explicit, os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).exists():
            return cand
    raise ChromiumNotFound(
        "no Chromium found: install Debian's package (`apt-get update && apt-get install -y chromium`; "
        "`make check-book` and `make test` do it) or set CHROMIUM=/path/to/chromium"
    )


class DevTools:
    """A headless Chromium and its DevTools protocol over a pipe. Use as a context manager."""

    def __init__(self, chromium: str, window: tuple[int, int] = WINDOW, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="vstain-chromium-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads them on fd 3
        self._evt_r, evt_w = os.pipe()  # Chromium writes replies and events on fd 4

        def wire_fds():  # in the child, before exec: the pipe ends become fds 3 and 4
            a, b = os.dup(cmd_r), os.dup(evt_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = Path(self.profile) / "chromium.log"  # a file, not a pipe that could fill and stall
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--window-size={window[0]},{window[1]}", "--remote-debugging-pipe",
                 f"--user-data-dir={self.profile}/data", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=wire_fds, pass_fds=(3, 4),
            )
        os.close(cmd_r)
        os.close(evt_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.window = window

    # -- the wire ------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict | None:
        while b"\0" not in self._buf:
            left = deadline - time.time()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._evt_r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._evt_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit {self.proc.poll()}): {self._stderr()}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _stderr(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply is None:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout or self.timeout:.0f} s")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, timeout: float | None = None) -> dict | None:
        """Wait for an event (already received ones count); None on timeout."""
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.time() + (timeout or self.timeout)
        while True:
            msg = self._read_message(deadline)
            if msg is None:
                return None
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg

    def drain(self, quiet: float = 0.3) -> None:
        """Collect events until none arrive for ``quiet`` seconds."""
        while (msg := self._read_message(time.time() + quiet)) is not None:
            if "method" in msg:
                self.events.append(msg)

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "DevTools":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close", timeout=5)
                except Exception:  # already gone or not answering: terminate below
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self._cmd_w, self._evt_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)
