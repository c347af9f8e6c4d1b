"""The README's picture of the live-captions page: ``asr serve`` on a free port, a headless
Chromium whose fake microphone plays AUDIO (16 kHz WAV), the page autostarted, a screenshot once
FINALS finals are on it.

    python scripts/ops/page_screenshot.py AUDIO.wav docs/live_captions.png [--finals 3]
"""

from __future__ import annotations

import argparse
import base64
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from browser import Chromium  # noqa: E402  (the tests' DevTools driver)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--finals", type=int, default=3, help="finals on the page before the screenshot")
    parser.add_argument("--timeout-s", type=float, default=300)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    browser = None
    try:
        for line in server.stdout:
            if line.startswith("serving"):
                break
        else:
            print("asr serve did not start", file=sys.stderr)
            return 1
        browser = Chromium(fake_audio=args.audio.resolve())
        browser.call("Emulation.setDeviceMetricsOverride", width=900, height=560, deviceScaleFactor=1, mobile=False)
        browser.navigate(f"http://127.0.0.1:{port}/?autostart=1")
        browser.wait_for(f"document.querySelectorAll('#finals > div').length >= {args.finals}", args.timeout_s)
        time.sleep(0.5)
        shot = browser.call("Page.captureScreenshot", format="png")
        args.out.write_bytes(base64.b64decode(shot["data"]))
        finals = browser.evaluate("document.getElementById('finals').innerText")
        print(f"{args.out}: {finals!r}")
        return 0
    finally:
        if browser is not None:
            browser.close()
        server.send_signal(signal.SIGTERM)
        server.wait(120)


if __name__ == "__main__":
    sys.exit(main())
