"""``export --format websockify``: a recording as websockify's ``--record`` file.

websockify (0.10 and later) records each session as a JavaScript file that noVNC's
``tests/vnc_playback.html`` loads::

    var VNC_frame_data = [
    '{12{RFB 003.008\\n',        <- sent to the client: '{' time-in-ms '{' data
    '}15}RFB 003.008\\n',        <- received from the client: '}' time '}' data
    'EOF'];

Data is the message's bytes as Latin-1 characters, escaped the way websockify does it
(Python's ``unicode_escape`` plus ``\\'``), so noVNC's player detects the "binary"
encoding and decodes every character code back to a byte. Only data messages are
exported (websockify records nothing else); fragmented messages are joined and
stamped with the time their last frame arrived, as websockify stamps a message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from ..observe import Direction
from ..recording import FrameRecord, GapRecord, RecordingReader
from .messages import MessageAssembler

MARKERS = {Direction.DOWN: "{", Direction.UP: "}"}


def websockify_escape(data: bytes) -> str:
    return data.decode("latin-1").encode("unicode_escape").decode("ascii").replace("'", "\\'")


def export_websockify(
    reader: RecordingReader,
    out: TextIO,
    on_progress: Callable[[int], None] | None = None,
    on_gap: Callable[[GapRecord], None] | None = None,
) -> int:
    """Write the whole recording to ``out``; returns the number of messages written.
    websockify's format cannot mark a gap: ``on_gap`` is told of each one."""
    assemblers = {direction: MessageAssembler() for direction in Direction}
    out.write("var VNC_frame_data = [\n")
    count = 0
    for record in reader:
        if isinstance(record, GapRecord) and on_gap is not None:
            on_gap(record)
        if not isinstance(record, FrameRecord):
            continue
        message = assemblers[record.direction].feed(record.kind, record.fin, record.payload)
        if message is None:
            continue
        # Stamped when complete, as websockify does: the file stays in time order.
        marker = MARKERS[record.direction]
        data = websockify_escape(message.payload)
        out.write(f"'{marker}{record.time_us // 1000}{marker}{data}',\n")
        count += 1
        if on_progress is not None:
            on_progress(reader.position)
    out.write("'EOF'];\n")
    return count
