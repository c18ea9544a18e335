"""Moved to cronium_fab.testing.procs (the benches use it too); kept so branches in flight still import."""

from cronium_fab.testing.procs import *  # noqa: F403
