"""Errors the user can act on. Each says what went wrong and what to do."""

from __future__ import annotations


class CroniumFabError(Exception):
    """Base of every error cronium-fab reports to a user (CLI prints the message, no traceback)."""

    exit_code = 2


class ConfigError(CroniumFabError):
    """A setting is missing or malformed (environment variable, key file, ...)."""


class DatabaseUnavailable(CroniumFabError):
    """The database named by CRONIUM_DATABASE_URL cannot be reached or opened."""


class EventNotFound(CroniumFabError):
    def __init__(self, event_id: int) -> None:
        super().__init__(f"event {event_id} not found: check the id (`cronium-fab events` lists them)")
        self.event_id = event_id


class EventNotRunnable(CroniumFabError):
    """The event's type cannot run on SSH targets (HTTP_REQUEST, TOOL_ACTION, unknown)."""


class NoServers(CroniumFabError):
    """The event resolves to no usable server."""


class CredentialError(CroniumFabError):
    """A stored credential or env var value cannot be decrypted."""
