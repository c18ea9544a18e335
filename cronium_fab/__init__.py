"""cronium-fab: the SSH execution engine for Cronium, on Fabric and Invoke."""

from __future__ import annotations

__version__ = "0.1.0"
