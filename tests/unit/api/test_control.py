"""The control API as the CLI meets it: answers, clear errors, a server that survives bad clients."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from awg_split_tunnel.api.control import ControlServer, request
from awg_split_tunnel.errors import TunnelError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix-socket transport")


async def status(_: Mapping[str, Any]) -> dict[str, Any]:
    return {"tunnels": [{"id": "office", "state": "up"}]}


async def tunnel(req: Mapping[str, Any]) -> dict[str, Any]:
    if req.get("id") != "office":
        raise TunnelError(f"no tunnel {req.get('id')!r}")
    return {"state": req["action"]}


async def broken(_: Mapping[str, Any]) -> None:
    raise RuntimeError("boom")


def serve_and_ask(tmp_path: Path, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
    """Start a server, make blocking client calls from a thread (as the CLI does), return results or
    the raised TunnelError."""
    path = tmp_path / "control.sock"
    results: list[Any] = []

    async def main() -> None:
        server = ControlServer({"status": status, "tunnel": tunnel, "broken": broken}, path)
        await server.start()
        try:
            for cmd, args in calls:
                try:
                    results.append(await asyncio.to_thread(request, cmd, path=path, **args))
                except TunnelError as exc:
                    results.append(exc)
        finally:
            await server.stop()

    asyncio.run(main())
    return results


def test_commands_are_answered(tmp_path: Path) -> None:
    got = serve_and_ask(tmp_path, ("status", {}), ("tunnel", {"action": "down", "id": "office"}))
    assert got == [{"tunnels": [{"id": "office", "state": "up"}]}, {"state": "down"}]


def test_errors_come_back_as_clear_messages(tmp_path: Path) -> None:
    unknown, refused, crashed = serve_and_ask(
        tmp_path, ("reboot", {}), ("tunnel", {"action": "up", "id": "nope"}), ("broken", {})
    )
    assert isinstance(unknown, TunnelError) and "unknown command 'reboot'" in str(unknown)
    assert isinstance(refused, TunnelError) and "no tunnel 'nope'" in str(refused)
    assert isinstance(crashed, TunnelError) and "boom" in str(crashed)


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TunnelError, match="not running"):
        request("status", path=tmp_path / "absent.sock")


def test_garbage_from_a_client_does_not_stop_the_server(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def main() -> list[bytes]:
        server = ControlServer({"status": status}, path)
        await server.start()
        answers = []
        try:
            for garbage in (b"\xff\xfe not json\n", b"[1, 2]\n", b'{"cmd": 5}\n'):
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(garbage)
                answers.append(await reader.readline())
                writer.close()
            answers.append(
                (await asyncio.to_thread(request, "status", path=path))["tunnels"][0]["id"].encode()
            )
        finally:
            await server.stop()
        return answers

    answers = asyncio.run(main())
    assert all(b'"ok": false' in a for a in answers[:3])
    assert answers[3] == b"office"
    assert not path.exists()


def test_socket_is_private(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def main() -> int:
        server = ControlServer({"status": status}, path)
        await server.start()
        try:
            return path.stat().st_mode & 0o777
        finally:
            await server.stop()

    assert asyncio.run(main()) & 0o077 == 0
