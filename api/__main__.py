"""``python -m api``: serve the REST service with uvicorn on SPARKORCH_API_HOST:PORT."""

from __future__ import annotations

import logging

import uvicorn

from api.app import create_app
from orchestrator.settings import OrchestratorSettings


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = OrchestratorSettings()
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
