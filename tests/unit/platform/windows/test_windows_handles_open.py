"""Opening the Windows handles: WinDivertOpen's documented errors reach the user as one line each, and a
handle opened and closed leaves nothing behind (shut down first, so WinDivert re-injects its queue)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from fake_windivert import FakeWinDivert
from pydivert import Layer

from awg_split_tunnel.core.packet_router import ROUTER_FILTER
from awg_split_tunnel.platform import divert
from awg_split_tunnel.platform.divert import OPEN_ERRORS, open_with_pydivert
from awg_split_tunnel.platform.windows.handles import windows_router_handles

pytestmark = pytest.mark.windows


class _RefusingDivert:
    """A pydivert.Divert whose open() fails as WinDivertOpen does on Windows."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __call__(self, *args: Any, **kwargs: Any) -> _RefusingDivert:
        return self

    def open(self) -> None:
        exc = OSError(errno.EACCES, "WinDivertOpen failed")
        exc.winerror = self.code  # type: ignore[attr-defined]  # as Windows sets it
        raise exc


@pytest.mark.parametrize("code", sorted(OPEN_ERRORS))
def test_the_windows_handles_explain_each_documented_open_error(
    code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(divert.pydivert, "Divert", _RefusingDivert(code))
    network, events, _ = windows_router_handles(FakeWinDivert(), open_with_pydivert, ROUTER_FILTER)
    for handle in (network, *events[:2]):
        with pytest.raises(OSError) as info:
            handle.open()
        assert f"error {code}" in str(info.value) and OPEN_ERRORS[code] in str(info.value)


def test_a_closed_handle_was_shut_down_first_and_its_reader_ended() -> None:
    fake = FakeWinDivert()
    network = windows_router_handles(fake, fake.opener, ROUTER_FILTER)[0]
    network.open()
    network.watch(_Loop(), lambda: None)
    fake.wait_reading(Layer.NETWORK)
    handle = fake.handle(Layer.NETWORK)
    network.close()
    assert handle.shut and handle.closed and handle.pending is None
    assert fake.cancels == [(Layer.NETWORK, "cancelled")]  # nothing had arrived: truly cancelled


class _Loop:
    def call_soon_threadsafe(self, callback: Any) -> None:
        callback()

    def call_soon(self, callback: Any) -> None:
        callback()
