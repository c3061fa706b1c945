"""--buffer-responses over real sockets: the container's answer is taken off it as fast as
it comes, held for a client that reads slowly (memory, then an unnamed file), and the
container is let go at the answer's end; streams stay streams.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from wunderproxy.cli import main
from wunderproxy.config import ConfigError, Front


def test_start_up_refuses_a_buffer_directory_it_cannot_write_to(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = CliRunner().invoke(
        main,
        [
            "run",
            f"file://{tmp_path}",
            "p",
            "app",
            "--buffer-responses",
            "--buffer-dir",
            str(missing),
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"--buffer-dir {missing} cannot hold temporary files (No such file or directory)" in (
        " ".join(result.output.split())
    )
    with pytest.raises(ConfigError, match="create it, or name a writable directory"):
        Front(buffer_requests=True, buffer_dir=tmp_path / "missing")
    assert Front(buffer_dir=missing).buffer_dir == missing, "not looked at when not buffering"
