"""trio-bridge: a WebSocket-to-TCP bridge on Trio, in the line of websockify.

The embedding API::

    from trio_bridge import Bridge, Config, TcpAddress

    config = Config(target=TcpAddress("127.0.0.1", 5900))
    async with trio.open_nursery() as nursery:
        bridge = await nursery.start(Bridge(config).serve)   # or .serve(listeners)
        print(bridge.listen_addresses)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .addresses import TcpAddress, UnixAddress
    from .config import Config, Limits
    from .errors import ConfigError
    from .server import Bridge, serve

# Imported on first use: pytest imports trio_bridge.pytest_plugin (and so this package)
# in every run wherever trio-bridge is installed, and the server pulls in ~40 modules.
_HOME = {
    "Bridge": "server",
    "serve": "server",
    "Config": "config",
    "ConfigError": "config",
    "Limits": "config",
    "TcpAddress": "config",
    "UnixAddress": "config",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Bridge",
    "Config",
    "ConfigError",
    "Limits",
    "TcpAddress",
    "UnixAddress",
    "__version__",
    "serve",
]
