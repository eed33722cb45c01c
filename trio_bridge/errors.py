"""The two ways the bridge refuses to start, shared by every module (no project imports)."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value and why.

    The CLI prints it as a usage error (exit status 2).
    """


class StartupError(Exception):
    """The bridge cannot start (a port is taken, a folder is missing, ...).

    The message is one line naming the cause; the CLI prints it and exits 1. Raise it
    (or a subclass) from anything that runs before the bridge reports it is serving.
    """
