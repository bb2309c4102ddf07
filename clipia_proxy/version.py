"""The package version: a leaf module (it imports nothing), so any module may import it."""

from __future__ import annotations

__version__ = "0.1.0"
