"""What every command gets: settings read once from the environment."""

from __future__ import annotations

from functools import cached_property

from flashsale.config import Settings
from flashsale.stack.settings import StackSettings


class Context:
    @cached_property
    def settings(self) -> Settings:
        return Settings.from_env()

    @cached_property
    def stack_settings(self) -> StackSettings:
        """The local stack's settings; its MariaDB creates the database the product's settings name."""
        return StackSettings.from_env().with_overrides(database=self.settings.mysql_database)
