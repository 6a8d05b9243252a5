"""ASGI entry point for hypercorn (see Procfile): configuration comes from the environment."""

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
