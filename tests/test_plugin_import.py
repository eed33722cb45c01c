"""The pytest plugin is light to load: pytest imports it (entry point ``pytest11``) in
every run of every project where trio-bridge is installed, whether its tests use the
fixtures or not. It used to import the bridge, the recorder and the replay server:
~41 modules and ~150 ms, a ctypes libc binding among them, in each of those runs."""

from __future__ import annotations

import subprocess
import sys

# In a fresh interpreter: what importing the plugin adds to what pytest itself imports.
PROBE = """
import sys
import pytest
before = set(sys.modules)
import trio_bridge.pytest_plugin
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_loading_the_plugin_imports_nothing_but_itself_and_the_version() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    added = probe.stdout.split()
    assert added == ["trio_bridge", "trio_bridge.pytest_plugin", "trio_bridge.version"], added
    for heavy in ("trio_bridge.server", "trio_bridge.session", "trio_bridge.recording", "trio"):
        assert heavy not in added


def test_the_package_api_is_still_there_on_first_use() -> None:
    """``trio_bridge`` imports its API when it is first asked for (PEP 562)."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, trio_bridge; assert 'trio_bridge.server' not in sys.modules; "
            "from trio_bridge import Bridge, Config, TcpAddress, serve; "
            "from trio_bridge.pytest_plugin import RunningBridge, StartBridge, StartReplay; "
            "print(Bridge.__module__, Config.__module__, serve.__module__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [
        "trio_bridge.server",
        "trio_bridge.config",
        "trio_bridge.server",
    ]
