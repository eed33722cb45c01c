"""The ``drive_recording`` fixture: a recorded client against a server, as a test."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from trio_bridge.pytest_plugin import DriveRecording, StartBridge

from .recording_support import record_scripted_session, scripted_target, start_tcp_target


@pytest.fixture
async def recording(nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path) -> Path:
    with trio.fail_after(20):
        return await record_scripted_session(nursery, start_ws_bridge, tmp_path)


async def test_a_server_that_behaves_as_recorded_passes(
    nursery: trio.Nursery, recording: Path, drive_recording: DriveRecording
) -> None:
    target = await start_tcp_target(nursery, scripted_target())
    with trio.fail_after(20):
        report = await drive_recording(recording, target=str(target), delay=False)
    assert report.ok and report.sent_messages == 4


async def test_a_server_that_differs_fails_the_test_with_the_report(
    nursery: trio.Nursery, recording: Path, drive_recording: DriveRecording
) -> None:
    changed = await start_tcp_target(nursery, scripted_target(greeting=b"RFB 003.007\n"))
    with trio.fail_after(20), pytest.raises(pytest.fail.Exception) as failure:
        await drive_recording(recording, target=(changed.host, changed.port), delay=False)
    report = str(failure.value)
    assert "@@ target->client message #1, byte 10, recorded at" in report
    assert report.splitlines()[-1].startswith("result: DIFFERENT from the recording")
    assert not failure.value.pytrace  # the report is the message, no traceback into the plugin


async def test_images_need_the_rfb_comparator(
    recording: Path, drive_recording: DriveRecording, tmp_path: Path
) -> None:
    with pytest.raises(TypeError, match="images= needs compare='rfb'"):
        await drive_recording(recording, target="127.0.0.1:9", images=tmp_path)
