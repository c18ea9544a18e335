"""Where cronium-fab keeps its own files, one function each (standard library only: the entry
point imports this before anything heavy). Every other module asks here."""

from __future__ import annotations

import os


def data_dir() -> str:
    """cronium-fab's data directory (``CRONIUM_FAB_DATA_DIR``, else ``$XDG_DATA_HOME/cronium-fab``):
    the embedded database, our known_hosts and the worker's socket."""
    explicit = os.environ.get("CRONIUM_FAB_DATA_DIR")
    if explicit:
        return os.path.expanduser(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "cronium-fab")


def socket_path() -> str:
    """Where the worker listens: ``CRONIUM_FAB_WORKER_SOCKET``, else ``<data dir>/worker.sock``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("CRONIUM_FAB_WORKER_SOCKET")
                                              or os.path.join(data_dir(), "worker.sock")))


def known_hosts_path(data: str | None = None) -> str:
    """Our known_hosts file, in the data directory ``data`` (default: ``data_dir()``)."""
    return os.path.join(data if data is not None else data_dir(), "known_hosts")


def database_url(data: str | None = None) -> str:
    """The embedded SQLite database in the data directory ``data`` (default: ``data_dir()``)."""
    return f"sqlite:///{os.path.join(data if data is not None else data_dir(), 'cronium.db')}"
