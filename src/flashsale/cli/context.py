"""What every command gets: settings read once from the environment."""

from __future__ import annotations

from functools import cached_property

from flashsale.config import Settings


class Context:
    @cached_property
    def settings(self) -> Settings:
        return Settings.from_env()
