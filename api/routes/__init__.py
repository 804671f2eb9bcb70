"""HTTP routes, one module per resource; each route only translates HTTP <-> JobService."""

from __future__ import annotations

from typing import Any

from api.problems import PROBLEM_MEDIA_TYPE, TITLES, Problem


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem responses a route can give."""
    return {
        code: {
            "model": Problem,
            "description": TITLES.get(code, "Error"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }


AUTH_PROBLEMS = (401, 413, 429, 500)
