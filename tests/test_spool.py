"""The spool of buffered bodies: memory up to its bound, then a file nobody can see."""

from __future__ import annotations

import errno
import os
import random
import resource
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.openfiles import open_descriptors_under, open_files_under
from wunderproxy.cli import main
from wunderproxy.config import ConfigError, check_buffer_dir
from wunderproxy.spool import READ_SIZE, Spool, SpoolTrouble


def read_all(spool: Spool) -> bytes:
    parts = []
    while data := spool.read():
        parts.append(data)
    return b"".join(parts)


def test_a_body_within_the_memory_bound_never_touches_the_disk(tmp_path: Path) -> None:
    spool = Spool(1024, tmp_path)
    spool.write(b"a" * 600)
    spool.write(b"b" * 424)
    assert (spool.size, spool.in_memory, spool.on_disk) == (1024, 1024, False)
    assert read_all(spool) == b"a" * 600 + b"b" * 424
    assert spool.in_memory == 0


def test_the_rest_goes_to_a_file_and_comes_back_in_order(tmp_path: Path) -> None:
    spool = Spool(1000, tmp_path)
    body = bytes(range(256)) * 4000  # a million bytes, no two neighbours alike
    for at in range(0, len(body), 16384):
        spool.write(body[at : at + 16384])
    assert (spool.size, spool.in_memory, spool.on_disk) == (len(body), 1000, True)
    first = spool.read()
    assert first == body[:1000] and spool.in_memory == 0
    assert len(spool.read()) == READ_SIZE
    spool.close()
    again = Spool(1000, tmp_path)
    for at in range(0, len(body), 16384):
        again.write(body[at : at + 16384])
    assert read_all(again) == body
    again.close()


def test_its_file_has_no_name_so_a_crash_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(10, tmp_path)
    spool.write(b"x" * 100_000)
    assert spool.on_disk and list(tmp_path.iterdir()) == []
    # The open file is there all the same: the process holds it, deleted.
    assert len(open_files_under(tmp_path)) == 1
    spool.close()
    spool.close()  # idempotent
    assert open_files_under(tmp_path) == []


def test_a_missing_directory_is_an_os_error_naming_it(tmp_path: Path) -> None:
    spool = Spool(10, tmp_path / "gone")
    spool.write(b"x" * 10)  # fits in memory: no file needed yet
    with pytest.raises(OSError, match="gone"):
        spool.write(b"y")


def test_bytes_written_while_earlier_ones_are_read_come_out_in_order(tmp_path: Path) -> None:
    # An answer taken off a container while its client reads: writes and reads interleave,
    # memory fills, the file takes the rest, memory is used again once the file is read.
    spool = Spool(100_000, tmp_path)
    body = random.Random(1).randbytes(3_000_000)
    steps = random.Random(2)
    written = 0
    out = bytearray()
    while len(out) < len(body):
        if written < len(body) and steps.random() < 0.6:
            size = steps.choice((1, 1000, 65536, 300_000))
            spool.write(body[written : written + size])
            written = min(len(body), written + size)
        else:
            out += spool.read()
        assert spool.in_memory <= 100_000
        assert spool.unread == written - len(out)
    assert bytes(out) == body
    assert spool.on_disk and spool.read() == b""
    spool.close()


def test_a_file_read_to_its_end_is_written_over_from_its_start(tmp_path: Path) -> None:
    spool = Spool(10, tmp_path)
    for round_ in range(5):
        spool.write(b"%d" % round_ * 10 + b"x" * 100_000)
        assert read_all(spool) == b"%d" % round_ * 10 + b"x" * 100_000
        # Read to its end: memory takes the next bytes first again.
        spool.write(b"y" * 10)
        assert spool.in_memory == 10
        assert spool.read() == b"y" * 10
    (descriptor,) = open_descriptors_under(tmp_path)
    assert os.fstat(descriptor).st_size == 100_000  # not 5 x 100,000
    spool.close()


def test_a_write_the_file_cannot_take_is_kept_nowhere_and_the_rest_reads_back(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "buffers"
    directory.mkdir()
    spool = Spool(1000, directory)
    spool.write(b"a" * 600)
    directory.rmdir()  # --buffer-dir gone: the file cannot be made
    with pytest.raises(FileNotFoundError):
        spool.write(b"b" * 1000)  # 400 would fit in memory, 600 not
    assert (spool.unread, spool.in_memory, spool.on_disk) == (600, 600, False)
    directory.mkdir()
    spool.write(b"c" * 5000)
    # A file that can grow only so far (as on a full disk): a write that fails halfway
    # leaves nothing of itself to read back.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8000, hard))
    try:
        with pytest.raises(OSError, match="too large"):
            spool.write(b"d" * 5000)  # the file's first 3,000 bytes fit, the rest not
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    spool.write(b"e" * 10)
    assert read_all(spool) == b"a" * 600 + b"c" * 5000 + b"e" * 10
    spool.close()


def test_spool_trouble_is_counted_and_said_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trouble = SpoolTrouble()
    error = OSError(errno.ENOSPC, "No space left on device")
    for _ in range(3):
        trouble.failed(error, tmp_path, "answers stream")
    assert trouble.failures == 3
    (line,) = [r.getMessage() for r in caplog.records if "cannot hold" in r.getMessage()]
    assert f"under {tmp_path} (No space left on device; 1 so far): answers stream" in line
    assert "point --buffer-dir at a directory with room" in line


def test_read_at_reads_from_any_offset_as_often_as_asked_and_keeps_it_all(
    tmp_path: Path,
) -> None:
    """A buffered request may be sent again from its start: nothing is let go."""
    spool = Spool(1000, tmp_path)
    body = bytes(range(256)) * 4000
    for at in range(0, len(body), 16384):
        spool.write(body[at : at + 16384])
    for _ in range(2):
        parts, offset = [], 0
        while data := spool.read_at(offset):
            assert len(data) <= READ_SIZE
            parts.append(data)
            offset += len(data)
        assert b"".join(parts) == body
    assert spool.read_at(500) == body[500:1000]  # the memory's end: a read does not span it
    assert spool.read_at(1000 + 7)[:5] == body[1007:1012]
    assert spool.in_memory == 1000
    spool.close()


def test_read_at_without_a_file_ends_at_the_memorys_end(tmp_path: Path) -> None:
    spool = Spool(1000, tmp_path)
    spool.write(b"abc")
    assert (spool.read_at(0), spool.read_at(3)) == (b"abc", b"")


@pytest.mark.parametrize("problem", ["missing", "a file"])
def test_a_directory_no_spool_can_use_stops_start_up_naming_it(
    tmp_path: Path, problem: str
) -> None:
    directory = tmp_path / "spool"
    if problem == "a file":
        directory.write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"--buffer-dir {directory} cannot hold temporary files"):
        check_buffer_dir(directory)


def test_a_usable_directory_passes_the_check_and_keeps_nothing(tmp_path: Path) -> None:
    check_buffer_dir(tmp_path)
    assert list(tmp_path.iterdir()) == [] and open_files_under(tmp_path) == []


def test_run_refuses_a_buffer_dir_it_cannot_use_before_anything_starts(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = CliRunner().invoke(
        main,
        [
            "run",
            f"file://{tmp_path}",
            "p",
            "app",
            "--buffer-requests",
            "--buffer-dir",
            str(missing),
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"--buffer-dir {missing} cannot hold temporary files" in result.output
