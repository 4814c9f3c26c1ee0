"""The `flashsale` command line."""

from __future__ import annotations

from flashsale.cli.main import main

__all__ = ["main"]
