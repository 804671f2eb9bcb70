"""FastAPI dependencies: the job service and the authenticated owner."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth import ReloadingTokenRegistry
from api.limits import RateLimiter, retry_after
from api.problems import ProblemException
from orchestrator.control.service import JobService

bearer = HTTPBearer(auto_error=False, description="an API token (sparkctl: SPARKORCH_TOKEN)")


def get_service(request: Request) -> JobService:
    return request.app.state.service


def get_owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The token's owner; 401 without a known token, 429 over the owner's rate."""
    challenge = {"WWW-Authenticate": 'Bearer realm="sparkorch"'}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemException(401, "send Authorization: Bearer <token>", headers=challenge)
    registry: ReloadingTokenRegistry = request.app.state.tokens  # re-reads the file on change
    owner = registry.owner_of(credentials.credentials)
    if owner is None:
        raise ProblemException(401, "unknown or revoked token", headers=challenge)
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.acquire(owner)
    if wait > 0:
        raise ProblemException(
            429,
            f"over {limiter.rate:g} requests/s for {owner}; retry later",
            headers={"Retry-After": retry_after(wait)},
        )
    return owner


Owner = Annotated[str, Depends(get_owner)]
Service = Annotated[JobService, Depends(get_service)]
