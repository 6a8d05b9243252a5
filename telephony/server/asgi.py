"""ASGI entry point for a server run on its own (`uvicorn telephony.server.asgi:app`):
configuration comes from the environment; that server's own signal handling applies, so calls
are not drained on SIGTERM as under `telephony serve`."""

from __future__ import annotations

import logging

from dotenv import load_dotenv

from ..settings import Settings
from .app import create_app

load_dotenv()
settings = Settings.from_env()
logging.basicConfig(
    level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
)
app = create_app(settings)
