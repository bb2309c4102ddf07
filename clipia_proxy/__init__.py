"""clipia-proxy: a company's own gateway in front of Clipia AI Gateway."""

from __future__ import annotations

from .app import create_admin_app, create_app
from .config import Config, ConfigError, load_config
from .version import __version__

__all__ = ["Config", "ConfigError", "__version__", "create_admin_app", "create_app", "load_config"]
