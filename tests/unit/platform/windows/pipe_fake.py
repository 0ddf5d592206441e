"""Windows named pipes in memory, as the Win32 documentation describes them (CreateNamedPipeW,
ConnectNamedPipe, CreateFileW; docs/WINDOWS.md, Control pipe):

- a second ``CreateNamedPipe`` of an existing name with ``FILE_FLAG_FIRST_PIPE_INSTANCE`` fails with
  ERROR_ACCESS_DENIED;
- a client's ``CreateFile`` fails with ERROR_FILE_NOT_FOUND when no instance exists, ERROR_ACCESS_DENIED
  when the pipe's DACL grants none of the caller's SIDs or the caller is remote and the pipe was made with
  ``PIPE_REJECT_REMOTE_CLIENTS``, ERROR_PIPE_BUSY when every instance has a client;
- ``ConnectNamedPipe`` blocks until a client opens that instance; ``DisconnectNamedPipe`` and closing
  either end end the other's reads;
- calls on one synchronous handle run one after another: a ReadFile waiting for data holds up every
  other call on that handle (DisconnectNamedPipe, WriteFile, PeekNamedPipe) from any thread.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from awg_split_tunnel.platform.windows.pipe import (
    ERROR_ACCESS_DENIED,
    ERROR_BROKEN_PIPE,
    ERROR_FILE_NOT_FOUND,
    ERROR_PIPE_BUSY,
    ERROR_PIPE_NOT_CONNECTED,
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    PIPE_REJECT_REMOTE_CLIENTS,
    PipeError,
)

SYSTEM = frozenset({"SY"})
ADMINISTRATOR = frozenset({"BA", "BU", "S-1-5-21-1-2-3-500"})
STANDARD_USER = frozenset({"BU", "AU", "WD", "S-1-5-21-1-2-3-1001"})


@dataclass(frozen=True)
class Caller:
    sids: frozenset[str]
    remote: bool = False


def granted_sids(sddl: str) -> set[str]:
    """The trustees of the allow ACEs with generic-all access in the DACL of `sddl`."""
    dacl = sddl.split("D:", 1)[1].split("S:", 1)[0]
    return {m.group(2) for m in re.finditer(r"\(A;[^;]*;(GA|FA);;;([^)]+)\)", dacl)}


@dataclass
class _Instance:
    name: str
    pipe_mode: int
    sddl: str
    client: int | None = None
    connected: bool = False
    used: bool = False
    """An instance serves one client; the server then disconnects and closes it."""
    closed: bool = False
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


class FakePipes:
    def __init__(self) -> None:
        self.caller = Caller(SYSTEM)
        self._cond = threading.Condition()
        self._servers: dict[int, _Instance] = {}
        self._clients: dict[int, _Instance] = {}
        self._next = 100
        self.refused: list[int] = []
        self._serial: dict[int, threading.Lock] = {}

    def _handle(self) -> int:
        self._next += 1
        self._serial[self._next] = threading.Lock()
        return self._next

    def _one_at_a_time(self, handle: int) -> threading.Lock:
        return self._serial[handle]

    def instances(self, name: str) -> list[_Instance]:
        return [i for i in self._servers.values() if i.name.lower() == name.lower() and not i.closed]

    def create_named_pipe(self, name: str, open_mode: int, pipe_mode: int, sddl: str) -> int:
        with self._cond:
            existing = self.instances(name)
            if existing and open_mode & FILE_FLAG_FIRST_PIPE_INSTANCE:
                raise PipeError("CreateNamedPipeW", ERROR_ACCESS_DENIED)
            handle = self._handle()
            self._servers[handle] = _Instance(name, pipe_mode, existing[0].sddl if existing else sddl)
            return handle

    def connect_named_pipe(self, pipe: int) -> None:
        with self._one_at_a_time(pipe), self._cond:
            instance = self._servers[pipe]
            self._cond.wait_for(lambda: instance.used or instance.closed)
            if instance.closed:
                raise PipeError("ConnectNamedPipe", 6)

    def disconnect_named_pipe(self, pipe: int) -> None:
        with self._one_at_a_time(pipe), self._cond:
            instance = self._servers[pipe]
            instance.connected = False
            instance.client = None
            self._cond.notify_all()

    def create_file(self, name: str) -> int:
        with self._cond:
            instances = self.instances(name)
            if not instances:
                raise PipeError("CreateFileW", ERROR_FILE_NOT_FOUND)
            first = instances[0]
            if self.caller.remote and first.pipe_mode & PIPE_REJECT_REMOTE_CLIENTS:
                self.refused.append(ERROR_ACCESS_DENIED)
                raise PipeError("CreateFileW", ERROR_ACCESS_DENIED)
            if not granted_sids(first.sddl) & self.caller.sids:
                self.refused.append(ERROR_ACCESS_DENIED)
                raise PipeError("CreateFileW", ERROR_ACCESS_DENIED)
            free = [i for i in instances if not i.used]
            if not free:
                raise PipeError("CreateFileW", ERROR_PIPE_BUSY)
            handle = self._handle()
            free[0].client = handle
            free[0].connected = True
            free[0].used = True
            self._clients[handle] = free[0]
            self._cond.notify_all()
            return handle

    def wait_named_pipe(self, name: str, timeout_ms: int) -> None:
        with self._cond:
            if not self._cond.wait_for(
                lambda: any(not i.used for i in self.instances(name)), timeout_ms / 1000
            ):
                raise PipeError("WaitNamedPipeW", 121)

    def read_file(self, handle: int, size: int) -> bytes:
        with self._one_at_a_time(handle), self._cond:
            if handle in self._servers:
                instance = self._servers[handle]
                buffer = instance.to_server
            else:
                instance = self._clients[handle]
                buffer = instance.to_client
            self._cond.wait_for(lambda: bool(buffer) or not self._live(instance, handle))
            data = bytes(buffer[:size])
            del buffer[:size]
            return data

    def peek_named_pipe(self, handle: int) -> int:
        with self._one_at_a_time(handle), self._cond:
            if handle in self._servers:
                instance, buffer = self._servers[handle], self._servers[handle].to_server
            else:
                instance, buffer = self._clients[handle], self._clients[handle].to_client
            if not buffer and not self._live(instance, handle):
                raise PipeError("PeekNamedPipe", ERROR_BROKEN_PIPE)
            return len(buffer)

    def _live(self, instance: _Instance, handle: int) -> bool:
        if instance.closed:
            return False
        if handle in self._servers:
            return instance.connected
        return instance.client == handle

    def write_file(self, handle: int, data: bytes) -> None:
        with self._one_at_a_time(handle), self._cond:
            if handle in self._servers:
                instance = self._servers[handle]
                if not self._live(instance, handle):
                    raise PipeError("WriteFile", ERROR_PIPE_NOT_CONNECTED)
                instance.to_client += data
            else:
                instance = self._clients[handle]
                if not self._live(instance, handle):
                    raise PipeError("WriteFile", ERROR_PIPE_NOT_CONNECTED)
                instance.to_server += data
            self._cond.notify_all()

    def close_handle(self, handle: int) -> None:
        with self._cond:
            if handle in self._servers:
                self._servers.pop(handle).closed = True
            elif handle in self._clients:
                instance = self._clients.pop(handle)
                if instance.client == handle:
                    instance.client = None
                    instance.connected = False  # the server's reads end
            self._cond.notify_all()
