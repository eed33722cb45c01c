"""trio-bridge-replay: show, serve, drive and export session recordings (docs/replay.md).

Public API (the command line is built on it)::

    from trio_bridge.replay import ReplayServer, drive

    server = ReplayServer("session.tbrec", lockstep=True)
    await nursery.start(server.serve)             # ws://127.0.0.1:{server.port}/
    report = await drive("session.tbrec", target=TcpAddress("127.0.0.1", 5900))
    assert report.ok, "\\n".join(report.lines())
"""

from .compare import Comparator, Divergence, Finding, StreamComparator
from .control import PlaybackControl
from .drive import DriveReport, drive, make_comparator
from .export import export_websockify
from .messages import Message
from .serve import ReplayServer, ServeReport
from .timeline import PayloadView, print_timeline

__all__ = [
    "Comparator",
    "Divergence",
    "DriveReport",
    "Finding",
    "Message",
    "PayloadView",
    "PlaybackControl",
    "ReplayServer",
    "ServeReport",
    "StreamComparator",
    "drive",
    "export_websockify",
    "make_comparator",
    "print_timeline",
]
