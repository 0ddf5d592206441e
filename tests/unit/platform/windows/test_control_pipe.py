"""The control API over a named pipe (docs/WINDOWS.md, Control pipe), run against pipes in memory that
behave as Windows documents them (pipe_fake.py): only SYSTEM and Administrators get in, a second daemon (or
a squatter on the name) cannot join the pipe, remote clients are refused, and the commands answer as over
the Unix socket."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pipe_fake import ADMINISTRATOR, STANDARD_USER, SYSTEM, Caller, FakePipes, granted_sids

from awg_split_tunnel.api.control import ControlServer, request
from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.platform.windows.pipe import (
    DEFAULT_PIPE,
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    PIPE_ACCESS_DUPLEX,
    PIPE_SDDL,
    NamedPipeTransport,
    pipe_name,
)

pytestmark = pytest.mark.windows


async def _status(request: Any) -> dict[str, Any]:
    return {"tunnels": [{"id": "vpn"}]}


async def _down(request: Any) -> dict[str, Any]:
    return {"id": request.get("id"), "state": "down"}


def _ask(pipes: FakePipes, caller: Caller, cmd: str, **args: Any) -> Any:
    pipes.caller = caller
    try:
        return request(cmd, path=DEFAULT_PIPE, transport=NamedPipeTransport(pipes), timeout=1.0, **args)
    finally:
        pipes.caller = Caller(SYSTEM)  # the daemon's own calls (waking its accepting thread at stop)


async def _serving(pipes: FakePipes) -> ControlServer:
    server = ControlServer(
        {"status": _status, "tunnel": _down}, DEFAULT_PIPE, transport=NamedPipeTransport(pipes)
    )
    await server.start()
    return server


def test_administrators_and_system_are_answered() -> None:
    async def scenario() -> None:
        pipes = FakePipes()
        server = await _serving(pipes)
        try:
            for caller in (Caller(SYSTEM), Caller(ADMINISTRATOR)):
                result = await asyncio.to_thread(_ask, pipes, caller, "tunnel", action="down", id="vpn")
                assert result == {"id": "vpn", "state": "down"}
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_a_standard_user_cannot_take_a_tunnel_down_or_read_connections() -> None:
    async def scenario() -> None:
        pipes = FakePipes()
        server = await _serving(pipes)
        try:
            with pytest.raises(TunnelError, match="permission denied"):
                await asyncio.to_thread(_ask, pipes, Caller(STANDARD_USER), "tunnel", action="down", id="vpn")
            assert pipes.refused
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_a_remote_client_is_refused_even_as_an_administrator() -> None:
    async def scenario() -> None:
        pipes = FakePipes()
        server = await _serving(pipes)
        try:
            with pytest.raises(TunnelError, match="permission denied"):
                await asyncio.to_thread(_ask, pipes, Caller(ADMINISTRATOR, remote=True), "status")
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_a_pipe_squatted_by_another_process_makes_the_daemon_fail_instead_of_joining_it() -> None:
    async def scenario() -> None:
        pipes = FakePipes()
        squatter = pipes.create_named_pipe(pipe_name(DEFAULT_PIPE), PIPE_ACCESS_DUPLEX, 0, "D:(A;;GA;;;WD)")
        server = ControlServer({"status": _status}, DEFAULT_PIPE, transport=NamedPipeTransport(pipes))
        with pytest.raises(OSError, match="another process already has a pipe of this name"):
            await server.start()
        pipes.close_handle(squatter)

    asyncio.run(scenario())


def test_the_pipe_is_created_first_instance_only_with_the_protected_dacl() -> None:
    created: list[tuple[int, str]] = []

    class Recording(FakePipes):
        def create_named_pipe(self, name: str, open_mode: int, pipe_mode: int, sddl: str) -> int:
            created.append((open_mode, sddl))
            return super().create_named_pipe(name, open_mode, pipe_mode, sddl)

    async def scenario() -> None:
        pipes = Recording()
        server = await _serving(pipes)
        await asyncio.to_thread(_ask, pipes, Caller(SYSTEM), "status")
        await server.stop()

    asyncio.run(scenario())
    assert created[0][0] & FILE_FLAG_FIRST_PIPE_INSTANCE
    assert all(sddl == PIPE_SDDL for _, sddl in created)
    assert granted_sids(PIPE_SDDL) == {"SY", "BA"} and "D:P" in PIPE_SDDL


def test_no_daemon_reads_as_not_running() -> None:
    with pytest.raises(TunnelError, match="not running"):
        _ask(FakePipes(), Caller(ADMINISTRATOR), "status")


def test_a_stopped_server_frees_the_name_for_the_next_daemon() -> None:
    async def scenario() -> None:
        pipes = FakePipes()
        await (await _serving(pipes)).stop()
        server = await _serving(pipes)
        assert await asyncio.to_thread(_ask, pipes, Caller(SYSTEM), "status") == {"tunnels": [{"id": "vpn"}]}
        await server.stop()

    asyncio.run(scenario())


def test_several_clients_one_after_another_and_a_malformed_line() -> None:
    async def scenario() -> None:
        pipes = FakePipes()
        server = await _serving(pipes)
        try:
            for _ in range(3):
                await asyncio.to_thread(_ask, pipes, Caller(SYSTEM), "status")
            pipes.caller = Caller(SYSTEM)
            connection = NamedPipeTransport(pipes).connect(DEFAULT_PIPE, 1.0)
            await asyncio.to_thread(connection.send, b"not json\n")
            line = await asyncio.to_thread(connection.receive_line, 1 << 20)
            connection.close()
            assert b"not JSON" in line
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_pipe_names() -> None:
    assert pipe_name("\\\\.\\pipe\\awg-split-tunnel\\") == "\\\\.\\pipe\\awg-split-tunnel"
    assert pipe_name("custom") == "\\\\.\\pipe\\custom"


def test_a_silent_client_is_disconnected_without_stalling_the_daemon() -> None:
    """A client that connects and says nothing is cut off after the idle timeout, and the daemon keeps
    answering others meanwhile (no call waits in ReadFile holding up the handle)."""
    answers: list[Any] = []

    async def scenario() -> None:
        pipes = FakePipes()
        server = ControlServer(
            {"status": _status}, DEFAULT_PIPE, transport=NamedPipeTransport(pipes), idle_timeout=0.3
        )
        await server.start()
        try:
            silent = NamedPipeTransport(pipes).connect(DEFAULT_PIPE, 5.0)
            answers.append(await asyncio.to_thread(_ask, pipes, Caller(SYSTEM), "status"))
            answers.append(await asyncio.to_thread(silent.receive_line, 1 << 20))  # b"": cut off
            silent.close()
        finally:
            await server.stop()

    thread = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the daemon's event loop stalled on the silent client's handle"
    assert answers == [{"tunnels": [{"id": "vpn"}]}, b""]
