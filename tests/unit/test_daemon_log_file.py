"""`run --log-file`: the daemon's log also goes to a file, 0600, rotated."""

from __future__ import annotations

import logging
import logging.handlers
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from awg_split_tunnel import daemon


@pytest.fixture
def package_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("awg_split_tunnel")
    before = list(logger.handlers)
    yield logger
    for handler in logger.handlers:
        if handler not in before:
            logger.removeHandler(handler)
            handler.close()


def test_the_log_file_gets_the_lines_is_private_and_rotates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package_logger: logging.Logger
) -> None:
    monkeypatch.setattr(daemon, "LOG_FILE_BYTES", 2000)
    log_file = tmp_path / "daemon.log"
    daemon.configure_logging("info", log_file)
    daemon.configure_logging("info", log_file)  # a config reload: still one file handler
    files = [h for h in package_logger.handlers if isinstance(h, daemon.PrivateRotatingFileHandler)]
    assert len(files) == 1
    for i in range(100):
        logging.getLogger("awg_split_tunnel.core").info("[Core] line %d of the test", i)
    for path in (log_file, tmp_path / "daemon.log.1"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert "[Core] line 99 of the test" in log_file.read_text()
    assert (tmp_path / "daemon.log.1").exists(), "rotated past LOG_FILE_BYTES"
    assert not (tmp_path / f"daemon.log.{daemon.LOG_FILE_BACKUPS + 1}").exists(), "old files are dropped"
