"""trio-bridge: a WebSocket-to-TCP bridge on Trio, in the line of websockify.

The embedding API::

    from trio_bridge import Bridge, Config, TcpAddress

    config = Config(target=TcpAddress("127.0.0.1", 5900))
    async with trio.open_nursery() as nursery:
        bridge = await nursery.start(Bridge(config).serve)   # or .serve(listeners)
        print(bridge.listen_addresses)
"""

from .config import Config, ConfigError, Limits, TcpAddress, UnixAddress
from .server import Bridge, serve

__version__ = "0.1.0"

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
