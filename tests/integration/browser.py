"""A headless Chromium driven over the DevTools protocol (Debian's ``chromium``; no driver
binary, no Selenium): navigate, evaluate JavaScript, set a file input, and record every URL the
page requests. Its fake microphone plays a WAV file in a loop."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Chromium:
    def __init__(self, fake_audio: Path | None = None, start_timeout_s: float = 60.0) -> None:
        if CHROMIUM is None:
            raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="asr-chromium-")
        args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
        if fake_audio is not None:
            args.append(f"--use-file-for-fake-audio-capture={fake_audio}")
        self.proc = subprocess.Popen([*args, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + start_timeout_s
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as reply:
            page = next(t for t in json.loads(reply.read()) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.requests: list[str] = []  # every URL the page asked for (Network.requestWillBeSent, websockets too)
        self.console: list[str] = []
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        for domain in ("Network", "Page", "Runtime"):
            self.call(f"{domain}.enable")

    def _read(self) -> None:
        try:
            for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                elif message.get("method") == "Network.requestWillBeSent":
                    self.requests.append(message["params"]["request"]["url"])
                elif message.get("method") == "Network.webSocketCreated":
                    self.requests.append(message["params"]["url"])
                elif message.get("method") == "Runtime.consoleAPICalled":
                    self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in message["params"]["args"]))
        except Exception:  # closed
            pass

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict:
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies, timeout_s):
                raise TimeoutError(f"{method}: no reply in {timeout_s} s")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float) -> Any:
        """Until ``expression`` is truthy (its value), or TimeoutError with the page's status line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with_page = self._try(expression)
            if with_page:
                return with_page
            time.sleep(0.2)
        status = self._try("document.getElementById('status')?.textContent")
        raise TimeoutError(f"{expression} still false after {timeout_s} s; the page's status: {status!r}")

    def _try(self, expression: str) -> Any:
        try:
            return self.evaluate(expression)
        except RuntimeError:
            return None

    def set_file(self, selector: str, path: Path) -> None:
        """Choose ``path`` in the file input ``selector`` (its change event fires)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
