"""thinkpress: a plugin registry and runner for reasoning-compression methods."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("thinkpress")
"""Marker for plugin hook implementations: ``@thinkpress.hookimpl``."""

__all__ = ["hookimpl", "__version__"]
