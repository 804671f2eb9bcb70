"""A small client of the REST service (what ``sparkctl``'s remote verbs use).

:class:`ApiClient` has one method per route; problem+json errors are raised as
:class:`ApiError`. Answers 429 (over the rate limit, queue full) and 503 (unavailable) are
retried after their ``Retry-After``, a bounded number of times within a bounded time, each
wait logged at WARNING.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
BACKOFF_CAP_S = 30.0


class ApiError(Exception):
    """An error answer of the service: status, detail and the failing fields."""

    def __init__(self, status: int, detail: str, errors: list[tuple[str, str]]) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors

    def __str__(self) -> str:
        lines = [f"HTTP {self.status}: {self.detail}"]
        lines += [f"  {field}: {message}" for field, message in self.errors]
        return "\n".join(lines)


class ApiClient:
    """The REST service at ``url`` with a bearer ``token``.

    ``max_attempts`` and ``max_wait_s`` bound the retries of 429 and 503 answers (the
    attempts in all, and the seconds from the first attempt to the last); ``sleep`` waits
    between them (tests pass a recorder), ``transport`` replaces httpx's (tests).
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float = 30.0,
        *,
        max_attempts: int = 5,
        max_wait_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not token:
            raise ValueError("no API token: set SPARKORCH_TOKEN (make run writes one)")
        self.max_attempts = max(1, max_attempts)
        self.max_wait_s = max_wait_s
        self.sleep = sleep
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ sending

    def _send(
        self, method: str, path: str, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        try:
            request = self.http.build_request(method, path, **kwargs)
            return self.http.send(request, stream=stream)
        except httpx.HTTPError as error:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {error}", []) from error

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send, and send again after a 429 or 503 while the bounds allow.

        Only idempotent requests are safe to repeat blindly; every request of this client is
        safe to repeat after a 429 or 503. The GETs are idempotent, and so is cancel (its 503,
        Ray unreachable, may come after the cancel request was recorded: asking again is
        harmless). POST /v1/jobs and release are not, but the service refuses them with 429
        before it changes anything (the rate limit is checked with the token, a full queue
        before the job is stored), and neither calls Ray, so a 503 there comes from in front
        of the service and was never applied: a retried submit creates one job. Connection
        errors are not retried: the request may have been applied before the connection broke.
        """
        started = time.monotonic()
        attempt = 1
        response = self._send(method, path, **kwargs)
        while (delay := self._retry_delay(response, attempt, started)) is not None:
            response.read()
            logger.warning(
                "%d from %s %s: %s; retrying in %g s (attempt %d/%d)",
                response.status_code,
                method,
                path,
                _problem(response).detail,
                delay,
                attempt + 1,
                self.max_attempts,
            )
            response.close()
            self.sleep(delay)
            attempt += 1
            response = self._send(method, path, **kwargs)
        return response

    def _retry_delay(self, response: httpx.Response, attempt: int, started: float) -> float | None:
        """Seconds to wait before the next attempt; None to keep this answer."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_attempts:
            return None
        delay = retry_after_s(response.headers.get("Retry-After"), attempt)
        if time.monotonic() - started + delay > self.max_wait_s:
            logger.warning(
                "%d from %s: not waiting %g s more (the client waits at most %g s in all)",
                response.status_code, response.url, delay, self.max_wait_s,
            )  # fmt: skip
            return None
        return delay

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _problem(response)
        return response.json()

    # ------------------------------------------------------------------ routes

    def submit(
        self, kind: str, spec: Any, idempotency_key: str | None = None, *, hold: bool = False
    ) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        # ``hold`` only when set: the body stays what it was for services before it.
        body: dict[str, Any] = {"kind": kind, "spec": spec} | ({"hold": True} if hold else {})
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def jobs(
        self,
        state: Sequence[str] = (),
        kind: str | None = None,
        name: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict:
        """One page of GET /v1/jobs (``state`` repeated matches any of them)."""
        params = {"state": list(state), "kind": kind, "name": name, "limit": limit}
        params["cursor"] = cursor
        return self._json("GET", "/v1/jobs", params={k: v for k, v in params.items() if v})

    def all_jobs(self, **filters: Any) -> Iterator[dict]:
        """Every job that ``filters`` (those of :meth:`jobs`) match, page after page."""
        cursor = filters.pop("cursor", None)
        while True:
            page = self.jobs(**filters, cursor=cursor)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def release(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/release")

    def progress(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}/progress")

    def results(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}/results")

    def logs(self, job_id: str, tail: int = 200) -> list[str]:
        return self._json("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail})["lines"]

    def follow_logs(self, job_id: str) -> Iterator[str]:
        response = self._request(
            "GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None, stream=True
        )
        try:
            if response.status_code >= 400:
                response.read()
                raise _problem(response)
            yield from response.iter_text()
        finally:
            response.close()


def retry_after_s(value: str | None, attempt: int, now: Callable[[], float] = time.time) -> float:
    """The wait a ``Retry-After`` asks for (delay-seconds or an HTTP date); without one
    (or one unreadable), 1, 2, 4… seconds after attempt 1, 2, 3…"""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        when = None
    if when is not None:
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        return max(0.0, when.timestamp() - now())
    return min(BACKOFF_CAP_S, 2.0 ** (attempt - 1))


def _problem(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text[:500], [])
    errors = [(e.get("field", ""), e.get("message", "")) for e in body.get("errors", [])]
    return ApiError(response.status_code, body.get("detail") or body.get("title", ""), errors)
