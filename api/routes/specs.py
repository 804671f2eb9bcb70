"""``/v1/specs``: the JSON Schemas of the job specs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import Owner
from api.routes import AUTH_PROBLEMS, problems
from orchestrator.kinds import JOB_KINDS

router = APIRouter(prefix="/v1/specs", tags=["specs"])


@router.get(
    "/schema",
    responses=problems(*AUTH_PROBLEMS),
    summary="JSON Schema of each job kind's spec ({kind: schema})",
)
def spec_schemas(owner: Owner) -> dict[str, Any]:
    return {name: kind.json_schema() for name, kind in JOB_KINDS.items()}
