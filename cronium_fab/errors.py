"""Errors the user can act on, and the exit statuses they end the program with (standard library
only). Each error says what went wrong and what to do.

    0 success · 1 run FAILURE · 2 usage / configuration error · 3 run PARTIAL · 4 run TIMEOUT
    5 run CANCELLED · 6 internal error (a bug: please report it)
    7 run STOPPED (the failure budget kept hosts from starting; they are ``skipped``)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5
EXIT_INTERNAL = 6
EXIT_STOPPED = 7


class CroniumFabError(Exception):
    """Base of every error cronium-fab reports to a user (CLI prints the message, no traceback)."""

    exit_code = EXIT_USAGE


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
