"""Fixtures for end-to-end tests in the network-namespace lab.

``lab`` gives a fresh, started :class:`~awg_split_tunnel.lab.Lab` (closed afterwards, even on failure);
``web_lab`` the same with the echo web server running. Tests marked ``@pytest.mark.root`` skip with a
reason when not run as root; ``needs_root`` below is the equivalent skipif for a test module to copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from awg_split_tunnel.lab import PREFIX_BASE, Lab, LabUnavailable, cleanup_stale, start_web

IS_ROOT = os.geteuid() == 0
ROOT_REASON = "needs root for network namespaces"

needs_root = pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked ``root`` when this process cannot build namespaces."""
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason=ROOT_REASON)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_labs() -> None:
    """Leftovers of crashed runs (whose owner process is gone) are removed before the tests start."""
    if IS_ROOT:
        cleanup_stale(PREFIX_BASE)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A started lab, closed at the end of the test."""
    if not IS_ROOT:
        pytest.skip(ROOT_REASON)
    instance = Lab()
    try:
        instance.start()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def web_lab(lab: Lab) -> Lab:
    """A started lab with the echo web server (HTTP :80, UDP echo :7) answering in ns web."""
    start_web(lab)
    return lab
