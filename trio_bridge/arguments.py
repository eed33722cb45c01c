"""argparse pieces shared by ``trio-bridge`` and ``trio-bridge-replay``.

Both promise the same thing for bad arguments: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split()[0]  # a subcommand's prog is "tool subcommand"
        self.exit(2, f"{self.prog}: error: {message} (see {command} --help)\n")


def positive_number(kind: str) -> Callable[[str], float]:
    """An argparse ``type`` accepting numbers greater than 0, naming ``kind`` otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return parse
