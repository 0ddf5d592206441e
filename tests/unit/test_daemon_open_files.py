"""The daemon raises its soft open-file limit at start: each relayed flow holds descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = """
import resource
from awg_split_tunnel.daemon import raise_open_file_limit

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, hard))
returned = raise_open_file_limit()
print(returned, *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _env() -> dict[str, str]:
    paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.mark.skipif(sys.platform == "win32", reason="open-file limits are POSIX")
def test_soft_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 64:
        pytest.skip("hard open-file limit too low to lower the soft one below it")
    env = _env()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(low=64)], capture_output=True, text=True, env=env, check=True
    )
    returned, soft_after, hard_after = (int(word) for word in done.stdout.split())
    expected = hard if hard != resource.RLIM_INFINITY else 65536
    assert soft_after == expected
    assert returned == expected
    assert hard_after == hard


@pytest.mark.skipif(sys.platform == "win32", reason="open-file limits are POSIX")
def test_nothing_changes_when_the_soft_limit_is_already_the_hard_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = SCRIPT.replace("{low}", "hard")
    env = _env()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    returned, soft_after, _ = done.stdout.split()
    if hard != resource.RLIM_INFINITY:
        assert returned == "None"
        assert int(soft_after) == hard
