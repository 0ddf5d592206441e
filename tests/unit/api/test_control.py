"""The control API as the CLI meets it: answers, clear errors, a server that survives bad clients."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from awg_split_tunnel.api.control import ControlServer, request, request_pages
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


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing; TimeoutError when it keeps the connection open."""
    return await asyncio.wait_for(reader.read(), seconds)


@pytest.mark.parametrize("sent", [b"", b'{"cmd": "sta'])
def test_a_silent_client_is_disconnected(tmp_path: Path, sent: bytes) -> None:
    path = tmp_path / "control.sock"

    async def main() -> tuple[bytes, int, float]:
        server = ControlServer({"status": status}, path, idle_timeout=0.2)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(sent)
            started = asyncio.get_running_loop().time()
            got = await _closed_within(reader, 3)
            took = asyncio.get_running_loop().time() - started
            writer.close()
            return got, server.timed_out, took
        finally:
            await server.stop()

    got, timed_out, took = asyncio.run(main())
    assert got == b"" and timed_out == 1 and took < 2


def test_a_client_that_keeps_talking_is_not_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def main() -> list[bytes]:
        server = ControlServer({"status": status}, path, idle_timeout=0.3)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            answers = []
            for _ in range(4):
                await asyncio.sleep(0.15)
                writer.write(b'{"cmd": "status"}\n')
                answers.append(await asyncio.wait_for(reader.readline(), 3))
            writer.close()
            return answers
        finally:
            await server.stop()

    assert all(b'"ok": true' in a for a in asyncio.run(main()))


def test_clients_beyond_the_cap_are_refused_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "control.sock"

    async def main() -> tuple[list[bytes], int, Any]:
        server = ControlServer({"status": status}, path, max_clients=2)
        await server.start()
        try:
            held = []
            for _ in range(2):
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(b'{"cmd": "status"}\n')
                assert b'"ok": true' in await asyncio.wait_for(reader.readline(), 3)
                held.append(writer)
            refusals = []
            for _ in range(3):
                reader, writer = await asyncio.open_unix_connection(str(path))
                refusals.append(await _closed_within(reader, 3))
                writer.close()
            refused = server.refused
            for writer in held:
                writer.close()
                await writer.wait_closed()
            for _ in range(50):
                if server.clients == 0:
                    break
                await asyncio.sleep(0.02)
            after = await asyncio.to_thread(request, "status", path=path)
            return refusals, refused, after
        finally:
            await server.stop()

    with caplog.at_level("WARNING", logger="awg_split_tunnel.api"):
        refusals, refused, after = asyncio.run(main())
    assert refused == 3
    for line in refusals:
        assert line.count(b"\n") == 1 and b'"ok": false' in line and b"too many clients" in line
    assert len([r for r in caplog.records if "control clients" in r.getMessage()]) == 1
    assert after["tunnels"][0]["id"] == "office"


async def pages(req: Mapping[str, Any]) -> dict[str, Any]:
    """Five pages of two flows each, as ``connections`` answers: ``next`` names the following one."""
    offset = req.get("offset", 0)
    await asyncio.sleep(0.1)
    following = {"listing": 1, "offset": offset + 2} if offset + 2 < 10 else None
    return {"flows": [{"n": offset}, {"n": offset + 1}], "total": 10, "next": following}


def test_pages_come_over_one_connection_and_a_client_that_stops_paging_is_disconnected(
    tmp_path: Path,
) -> None:
    path = tmp_path / "control.sock"

    async def main() -> tuple[list[int], int, int, bytes, int]:
        server = ControlServer({"connections": pages}, path, idle_timeout=0.3, max_clients=1)
        await server.start()
        try:
            # All pages (0.5 s in all, longer than the idle timeout) on one connection: the cap of one
            # client is never hit.
            results = await asyncio.to_thread(lambda: list(request_pages("connections", path=path)))
            flows = [f["n"] for result in results for f in result["flows"]]
            refused = server.refused
            # A client that asks for the first page and never for the next is cut off like any idle one,
            # and its place is free again.
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"cmd": "connections"}\n')
            await asyncio.wait_for(reader.readline(), 3)
            closed = await _closed_within(reader, 3)
            writer.close()
            after = await asyncio.to_thread(request, "connections", path=path)
            return flows, refused, server.timed_out, closed, len(after["flows"])
        finally:
            await server.stop()

    flows, refused, timed_out, closed, answered_after = asyncio.run(main())
    assert flows == list(range(10)) and refused == 0
    assert timed_out == 1 and closed == b"" and answered_after == 2
