"""Moved to cronium_fab.testing.factories (the benches use it too); kept so branches in flight still import."""

from cronium_fab.testing.factories import *  # noqa: F403
