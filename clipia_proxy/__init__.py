"""clipia-proxy: a company's own gateway in front of Clipia AI Gateway."""

from __future__ import annotations

__version__ = "0.1.0"

from .app import create_admin_app, create_app
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "__version__", "create_admin_app", "create_app", "load_config"]
