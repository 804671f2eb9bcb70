"""The request body limit over real HTTP (uvicorn): declared by Content-Length or streamed
chunked, a body over ``api_max_body_bytes`` is answered 413 problem+json, and the server
answers as soon as the limit is passed rather than after reading the rest."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TINY_SPEC, ApiServer

from api.auth import issue_token
from orchestrator.settings import OrchestratorSettings

LIMIT = 64 * 1024
CHUNK = 8 * 1024
SPEC: dict[str, Any] = {**TINY_SPEC, "name": "limits-tiny"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, str]]:
    """One app for the module (the limit tests share no state): the server and a token."""
    home: Path = tmp_path_factory.mktemp("limits") / "home"
    (home / "data").mkdir(parents=True)
    settings = OrchestratorSettings(
        home=home,
        ray_dashboard_url="http://127.0.0.1:9",  # nothing listens: Ray is not needed here
        api_rate_limit_per_s=1000,
        api_rate_burst=1000,
        api_max_body_bytes=LIMIT,
    )
    token = issue_token(settings.tokens_file, "alice")
    with ApiServer(settings, reconcile=False) as api:
        yield api, token


def chunks(body: bytes) -> Iterator[bytes]:
    """``body`` as a generator: httpx then sends it chunked, without a Content-Length."""
    for start in range(0, len(body), CHUNK):
        yield body[start : start + CHUNK]


def post_chunked(server: tuple[ApiServer, str], body: bytes) -> httpx.Response:
    api, token = server
    with api.client(token) as client:
        request = client.build_request(
            "POST",
            "/v1/jobs",
            content=chunks(body),
            headers={"content-type": "application/json"},
        )
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        return client.send(request)


def oversized_job(size: int) -> bytes:
    """A well-formed job whose tags make the JSON at least ``size`` bytes."""
    tags = {f"k{i}": "v" * 200 for i in range(size // 200 + 1)}
    return json.dumps({"kind": "pretrain", "spec": {**SPEC, "tags": tags}}).encode()


def assert_413(status: int, headers: dict[str, str], body: bytes) -> None:
    """The answer is the middleware's 413 problem, naming the limit."""
    assert status == 413, body
    assert headers["content-type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["status"] == 413 and problem["instance"] == "/v1/jobs"
    assert str(LIMIT) in problem["detail"]


def receive_some(sock: socket.socket) -> bytes:
    """The next bytes from ``sock``; a closed connection fails the test."""
    data = sock.recv(65536)
    if not data:
        pytest.fail("the server closed the connection before its whole answer")
    return data


def raw_exchange(api: ApiServer, head: list[str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` and ``body`` on a plain socket, never finishing the request body, and
    read one response: a server that waited for the rest would time the read out."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += receive_some(sock)
        header_block, _, rest = reply.partition(b"\r\n\r\n")
        lines = header_block.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        while len(rest) < int(headers["content-length"]):
            rest += receive_some(sock)
    return int(lines[0].split()[1]), headers, rest


def request_head(token: str, *extra: str) -> list[str]:
    """The request line and headers of an authenticated job submission."""
    return [
        "POST /v1/jobs HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {token}",
        "Content-Type: application/json",
        *extra,
    ]


def chunk_frames(body: bytes) -> bytes:
    """``body`` in HTTP/1.1 chunk framing, without the terminating zero-size chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in chunks(body) if part)


def test_a_chunked_body_over_the_limit_is_413(server: tuple[ApiServer, str]) -> None:
    response = post_chunked(server, oversized_job(4 * LIMIT))
    assert_413(response.status_code, dict(response.headers), response.content)


def test_a_chunked_body_is_refused_once_past_the_limit_not_after_the_rest(
    server: tuple[ApiServer, str],
) -> None:
    """The body never ends: the answer must come from the bytes read so far."""
    api, token = server
    head = request_head(token, "Transfer-Encoding: chunked")
    status, headers, body = raw_exchange(api, head, chunk_frames(oversized_job(LIMIT + CHUNK)))
    assert_413(status, headers, body)


def test_a_small_content_length_does_not_let_a_large_chunked_body_through(
    server: tuple[ApiServer, str],
) -> None:
    """Transfer-Encoding beats Content-Length (RFC 9112 6.3): the streamed bytes count."""
    api, token = server
    head = request_head(token, "Content-Length: 10", "Transfer-Encoding: chunked")
    status, headers, body = raw_exchange(api, head, chunk_frames(oversized_job(2 * LIMIT)))
    assert_413(status, headers, body)


def test_a_declared_content_length_over_the_limit_is_413_before_any_body(
    server: tuple[ApiServer, str],
) -> None:
    api, token = server
    head = request_head(token, f"Content-Length: {LIMIT + 1}")
    status, headers, body = raw_exchange(api, head, b"")
    assert_413(status, headers, body)
    body = oversized_job(LIMIT)
    with api.client(token) as client:
        response = client.post(
            "/v1/jobs", content=body, headers={"content-type": "application/json"}
        )
    assert response.request.headers["content-length"] == str(len(body))
    assert_413(response.status_code, dict(response.headers), response.content)


def test_a_chunked_body_under_the_limit_reaches_the_app(server: tuple[ApiServer, str]) -> None:
    invalid = json.dumps(
        {"kind": "pretrain", "spec": {**SPEC, "optim": {**SPEC["optim"], "epochs": -1}}}
    )
    response = post_chunked(server, invalid.encode())
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    fields = {e["field"] for e in response.json()["errors"]}
    assert "spec.optim.epochs" in fields, fields
    accepted = post_chunked(server, json.dumps({"kind": "pretrain", "spec": SPEC}).encode())
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["state"] == "QUEUED"
    malformed = post_chunked(server, b'{"kind": "pretrain", "spec": {')
    assert malformed.status_code == 400, malformed.text
