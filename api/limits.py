"""Request size limit (ASGI middleware) and a per-owner token-bucket rate limiter."""

from __future__ import annotations

import logging
import math
import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem_response

logger = logging.getLogger(__name__)


class BodySizeLimit:
    """Answers 413 before the app sees a body over ``max_bytes`` (declared or streamed).

    A Content-Length over the limit is refused before any body is read. Otherwise the body
    is read here, message by message, and refused as soon as the bytes seen pass the limit
    (the rest is never read, so at most ``max_bytes`` plus one message is held); a body
    within the limit is then replayed to the app. Reading it here, rather than counting in
    the app's ``receive``, is what makes the answer a 413: an error raised inside
    ``receive`` surfaces in FastAPI's body parsing, which turns it into a 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send)
            return
        # Counted even under a small Content-Length: with Transfer-Encoding: chunked as well,
        # the chunks frame the body (RFC 9112 6.3) and the declared length means nothing.
        messages = await self._read_within_limit(receive)
        if messages is None:
            await self._reject(scope, receive, send)
            return
        await self.app(scope, _replay(messages, receive), send)

    async def _read_within_limit(self, receive: Receive) -> list[Message] | None:
        """The request's messages up to its last body part; None once past the limit."""
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # http.disconnect: the app sees it too
                return messages
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                logger.info("refused a request body past %d bytes", self.max_bytes)
                return None
            if not message.get("more_body", False):
                return messages

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413, f"the body is larger than {self.max_bytes} bytes", instance=scope.get("path")
        )
        await response(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands out ``messages`` first, then defers to the server's (e.g.
    for the disconnect a streaming response waits for)."""
    pending = iter(messages)

    async def replay() -> Message:
        return next(pending, None) or await receive()

    return replay


class RateLimiter:
    """``rate`` requests per second per key, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0 when allowed, else the seconds to wait before the next request is."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
