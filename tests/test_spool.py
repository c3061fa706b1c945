"""The spool of buffered bodies: memory up to its bound, then a file nobody can see."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from wunderproxy import spool as spool_module
from wunderproxy.cli import main
from wunderproxy.config import ConfigError
from wunderproxy.spool import READ_SIZE, Spool, check_directory


def open_files_under(directory: Path) -> list[str]:
    """Files this process holds open under ``directory`` (deleted ones included)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


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
    with pytest.raises(ConfigError, match=rf"--buffer-dir {directory}: cannot make a temporary"):
        check_directory(directory, "--buffer-dir")


def test_a_usable_directory_passes_the_check_and_keeps_nothing(tmp_path: Path) -> None:
    check_directory(tmp_path, "--buffer-dir")
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
    assert f"--buffer-dir {missing}: cannot make a temporary file there" in result.output


class ShortWrites(io.FileIO):
    """A file whose writes take at most 1000 bytes each, as on a disk filling up."""

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return super().write(memoryview(data)[:1000])


def test_a_write_the_file_takes_only_part_of_is_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        spool_module.tempfile,
        "TemporaryFile",
        lambda **_: ShortWrites(tmp_path / "file", "w+b"),
    )
    spool = Spool(10, tmp_path)
    body = bytes(range(256)) * 40
    spool.write(body)
    assert read_all(spool) == body
    spool.close()
