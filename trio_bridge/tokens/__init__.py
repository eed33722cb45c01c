"""Token routing: one bridge, many targets, each named by a token the operator issued.

:mod:`.base` has the plugin interface, :mod:`.router` the resolver the server uses,
:mod:`.registry` the names websockify users know. See docs/plugins.md.
"""

from .allow import TargetAllowlist, TargetPattern
from .base import TokenPlugin, TokenStoreError, parse_target
from .registry import load_token_plugin
from .router import TokenRouter, extract_token, resolver_for

__all__ = [
    "TargetAllowlist",
    "TargetPattern",
    "TokenPlugin",
    "TokenRouter",
    "TokenStoreError",
    "extract_token",
    "load_token_plugin",
    "parse_target",
    "resolver_for",
]
