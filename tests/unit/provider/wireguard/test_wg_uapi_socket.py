"""`UapiSocket`, the control socket's adapter, in a temporary directory: mode 0600, a dead process's socket
replaced and a live one left alone, malformed requests and failing devices answered without ending the
server, the socket gone on stop."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.provider.wireguard.uapi import DeviceState, SetRequest, UapiError
from awg_split_tunnel.provider.wireguard.uapi_socket import UapiSocket, UapiSocketInUse, socket_name

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="UNIX sockets")

PRIVATE = bytes(range(1, 33))


class FakeDevice:
    tunnel_id = "wg"

    def __init__(self) -> None:
        self.applied: list[SetRequest] = []
        self.fail: Exception | None = None

    def uapi_state(self) -> DeviceState:
        if self.fail is not None:
            raise self.fail
        return DeviceState(PRIVATE, listen_port=51820)

    def apply_uapi(self, request: SetRequest) -> None:
        if self.fail is not None:
            raise self.fail
        self.applied.append(request)


async def ask(path: Path, data: bytes, answers: int = 1) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        await writer.drain()
        got = b""
        while got.count(b"errno=") < answers:
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        writer.close()


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def test_get_and_set_over_the_socket_which_only_its_owner_may_open(tmp_path: Path) -> None:
    async def scenario() -> None:
        device = FakeDevice()
        uapi = UapiSocket(device, "awgst0", tmp_path / "wireguard")
        await uapi.start()
        try:
            mode = os.stat(uapi.path)
            assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600
            assert await ask(uapi.path, b"get=1\n\n") == (
                f"private_key={PRIVATE.hex()}\nlisten_port=51820\nerrno=0\n\n".encode()
            )
            assert await ask(uapi.path, b"set=1\nfwmark=1\n\n") == b"errno=0\n\n"
            assert device.applied == [SetRequest(fwmark=1)]
        finally:
            await uapi.stop()
        assert not uapi.path.exists()

    run(scenario())


def test_bad_requests_and_failing_devices_get_an_errno_and_the_socket_keeps_answering(tmp_path: Path) -> None:
    async def scenario() -> None:
        device = FakeDevice()
        uapi = UapiSocket(device, "wg0", tmp_path)
        await uapi.start()
        try:
            two = b"set=1\nbogus\n\nset=1\nlisten_port=x\n\n"
            assert await ask(uapi.path, two, answers=2) == b"errno=-71\n\nerrno=-22\n\n"
            assert await ask(uapi.path, b"hello\n") == b"errno=-71\n\n"
            device.fail = UapiError(-22, "refused")
            assert await ask(uapi.path, b"set=1\n\n") == b"errno=-22\n\n"
            device.fail = RuntimeError("a bug")
            assert await ask(uapi.path, b"get=1\n\n") == b"errno=-55\n\n"
            device.fail = None
            assert (await ask(uapi.path, b"get=1\n\n")).endswith(b"errno=0\n\n")
        finally:
            await uapi.stop()

    run(scenario())


def test_a_dead_processs_socket_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(tmp_path / "wg0.sock"))
        stale.close()  # the file stays, nobody listens
        uapi = UapiSocket(FakeDevice(), "wg0", tmp_path)
        await uapi.start()
        try:
            assert (await ask(uapi.path, b"get=1\n\n")).endswith(b"errno=0\n\n")
        finally:
            await uapi.stop()

    run(scenario())


def test_a_live_socket_or_another_file_is_left_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = UapiSocket(FakeDevice(), "wg0", tmp_path)
        await first.start()
        try:
            with pytest.raises(UapiSocketInUse):
                await UapiSocket(FakeDevice(), "wg0", tmp_path).start()
            assert (await ask(first.path, b"get=1\n\n")).endswith(b"errno=0\n\n")
        finally:
            await first.stop()
        (tmp_path / "wg1.sock").write_text("not a socket")
        with pytest.raises(TunnelError):
            await UapiSocket(FakeDevice(), "wg1", tmp_path).start()
        assert (tmp_path / "wg1.sock").read_text() == "not a socket"

    run(scenario())


def test_stop_leaves_a_socket_that_replaced_ours(tmp_path: Path) -> None:
    async def scenario() -> None:
        uapi = UapiSocket(FakeDevice(), "wg0", tmp_path)
        await uapi.start()
        uapi.path.unlink()
        (tmp_path / "wg0.sock").write_text("someone else's")
        await uapi.stop()
        assert (tmp_path / "wg0.sock").exists()

    run(scenario())


def test_names_are_cut_to_what_wg_set_sends() -> None:
    assert socket_name("a-very-long-tunnel-id") == "a-very-long-tun"
    with pytest.raises(ValueError):
        UapiSocket(FakeDevice(), "../x", Path("/tmp"))
