"""Container health checks without curl: ``http URL``, ``tcp HOST:PORT``, ``raylet``.

Several checks may follow each other (``tcp 127.0.0.1:6379 raylet``); all must pass.
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path


def http(url: str) -> None:
    with urllib.request.urlopen(url, timeout=4) as response:
        if response.status >= 400:
            raise SystemExit(f"{url}: HTTP {response.status}")


def tcp(address: str) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=4):
        pass


def raylet() -> None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"/raylet" in cmdline.read_bytes().split(b"\0")[0]:
                return
        except OSError:
            continue
    raise SystemExit("no raylet process")


def main(argv: list[str]) -> None:
    while argv:
        check = argv.pop(0)
        if check == "raylet":
            raylet()
        elif check in ("http", "tcp"):
            (http if check == "http" else tcp)(argv.pop(0))
        else:
            raise SystemExit(f"unknown check {check!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
