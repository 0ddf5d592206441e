"""What a user sees when WinDivert cannot open on Windows, and which events the event handles ask for.

WinDivertOpen fails with a Windows error code (``OSError.winerror``); the documented ones are explained in
one line each (docs/WINDOWS.md). Loopback never needs routing, so the SOCKET and FLOW handles ask for
``!loopback`` events only (docs/WINDOWS.md, Loopback)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from awg_split_tunnel.platform import divert
from awg_split_tunnel.platform.divert import OPEN_ERRORS, NetworkHandle, SocketEventHandle


def _windows_error(code: int) -> OSError:
    exc = OSError(errno.EACCES, "WinDivertOpen failed")
    exc.winerror = code  # type: ignore[attr-defined]  # as Windows sets it (OSError.winerror)
    return exc


class _RefusingDivert:
    """A pydivert.Divert whose open() fails as WinDivertOpen does on Windows."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __call__(self, *args: Any, **kwargs: Any) -> _RefusingDivert:
        return self

    def open(self) -> None:
        raise _windows_error(self.code)


@pytest.mark.parametrize("code", sorted(OPEN_ERRORS))
@pytest.mark.parametrize("handle", [NetworkHandle("tcp"), SocketEventHandle()], ids=["network", "socket"])
def test_each_documented_open_error_is_one_actionable_line(
    code: int, handle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(divert.pydivert, "Divert", _RefusingDivert(code))
    monkeypatch.setattr(divert, "_interface_names", lambda: frozenset())
    with pytest.raises(OSError) as info:
        handle.open()
    text = str(info.value)
    assert f"error {code}" in text and OPEN_ERRORS[code] in text
    assert "\n" not in text


def test_an_unknown_error_is_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(divert.pydivert, "Divert", _RefusingDivert(31))
    monkeypatch.setattr(divert, "_interface_names", lambda: frozenset())
    with pytest.raises(OSError) as info:
        NetworkHandle("tcp").open()
    assert getattr(info.value, "winerror", None) == 31
