"""Screenshots of MLflow UI pages, taken with headless Chromium (Debian's ``chromium``).

    python scripts/mlflow_screenshot.py OUT.png "#/experiments/1/runs/<run id>/model-metrics"
        [--ui http://127.0.0.1:5000] [--size 1500x950] [--wait-ms 20000]

The UI is a single-page app: Chromium's virtual time budget lets it fetch and draw before
the picture is taken. How the README's pictures were made (``make run``'s MLflow UI).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
FRAGMENT = re.compile(r"^#/[A-Za-z0-9/_?=&.,%-]*$")


def screenshot(url: str, out: str, size: str, wait_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="sparkorch-chromium-") as profile:
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size.replace('x', ',')}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out}",
            url,
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("fragment", help="the UI route, from '#/'")
    parser.add_argument("--ui", default="http://127.0.0.1:5000")
    parser.add_argument("--size", default="1500x950")
    parser.add_argument("--wait-ms", type=int, default=20000)
    args = parser.parse_args()
    if not FRAGMENT.match(args.fragment):
        parser.error("fragment: a UI route such as '#/experiments/1/runs/<id>'")
    if not re.fullmatch(r"\d{3,5}x\d{3,5}", args.size):
        parser.error("size: WIDTHxHEIGHT in pixels")
    screenshot(f"{args.ui.rstrip('/')}/{args.fragment}", args.out, args.size, args.wait_ms)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
