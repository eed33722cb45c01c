"""Pause, resume and speed for ``serve``: one control shared by every client's play."""

from __future__ import annotations

import trio


class PlaybackControl:
    """Pause, resume and speed, shared by every client's play (the --web page's buttons,
    or code); each play follows a change as it comes."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self.paused = False
        self.changed = trio.Event()  # set, and replaced, at each change

    def pause(self) -> None:
        self.paused = True
        self._notify()

    def resume(self) -> None:
        self.paused = False
        self._notify()

    def set_speed(self, speed: float) -> None:
        if not speed > 0:
            raise ValueError("speed must be greater than 0")
        self.speed = speed
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
