"""A small client of the REST service (what ``sparkctl submit|jobs|status|logs|cancel|results``
use): one method per route, problem+json errors raised as :class:`ApiError`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx


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
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        if not token:
            raise ValueError("no API token: set SPARKORCH_TOKEN (make run writes one)")
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self.http.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {error}", []) from error
        if response.status_code >= 400:
            raise _problem(response)
        return response.json()

    def submit(self, kind: str, spec: Any, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json={"kind": kind, "spec": spec}, headers=headers)

    def jobs(self, **params: Any) -> dict:
        return self._json("GET", "/v1/jobs", params={k: v for k, v in params.items() if v})

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def progress(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}/progress")

    def results(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}/results")

    def logs(self, job_id: str, tail: int = 200) -> list[str]:
        return self._json("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail})["lines"]

    def follow_logs(self, job_id: str) -> Iterator[str]:
        with self.http.stream(
            "GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise _problem(response)
            yield from response.iter_text()


def _problem(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text[:500], [])
    errors = [(e.get("field", ""), e.get("message", "")) for e in body.get("errors", [])]
    return ApiError(response.status_code, body.get("detail") or body.get("title", ""), errors)
