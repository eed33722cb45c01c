"""Session recordings: the recorder (an observer factory for :class:`~trio_bridge.Bridge`),
the file format and its streaming reader. See docs/recording-format.md.

Public API::

    from trio_bridge.recording import Recorder, open_recorder, open_recording, load_recording
"""

from .format import (
    FILE_SUFFIX,
    VERSION,
    EndRecord,
    FormatError,
    FrameRecord,
    GapRecord,
    Kind,
    Meta,
    Record,
)
from .reader import (
    LoadedRecording,
    Outcome,
    ReadStatus,
    RecordingError,
    RecordingReader,
    load_recording,
    open_recording,
)
from .recorder import (
    DEFAULT_BUFFER_LIMIT,
    GapCallback,
    Recorder,
    RecordingFolderError,
    SessionRecorder,
    open_recorder,
    recorder_for,
    recording_name,
    running_recorder,
)

__all__ = [
    "DEFAULT_BUFFER_LIMIT",
    "FILE_SUFFIX",
    "VERSION",
    "EndRecord",
    "FormatError",
    "FrameRecord",
    "GapCallback",
    "GapRecord",
    "Kind",
    "LoadedRecording",
    "Meta",
    "Outcome",
    "ReadStatus",
    "Record",
    "Recorder",
    "RecordingError",
    "RecordingFolderError",
    "RecordingReader",
    "SessionRecorder",
    "load_recording",
    "open_recorder",
    "open_recording",
    "recorder_for",
    "recording_name",
    "running_recorder",
]
