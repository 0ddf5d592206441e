"""What an end-to-end module needs, as pytest marks: ``pytestmark = [*NEEDS_ROOT, NEEDS_WIREGUARD_GO]``."""

from __future__ import annotations

import os
import shutil

import pytest

NEEDS_ROOT = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
NEEDS_WIREGUARD_GO = pytest.mark.skipif(
    shutil.which("wireguard-go") is None or shutil.which("wg") is None,
    reason="needs wireguard-go and wg (Debian packages wireguard-go, wireguard-tools)",
)
