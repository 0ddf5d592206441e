"""Who owns a flow: connect events matched to first packets, namespace filtering, pid → exe, OS fallback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psutil
import pytest

from awg_split_tunnel.process.lookup import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    NAMESPACE_CACHE_TTL,
    ConnectEvents,
    ExeResolver,
    NamespaceFilter,
    netns_inode,
    os_lookup_pid,
    pid_owns_socket,
)

WEB = bytes([198, 18, 0, 10])


def test_events_are_claimed_by_remote_in_arrival_order() -> None:
    events = ConnectEvents()
    events.add_connect(IPPROTO_TCP, WEB, 80, 11, now=0.0)
    events.add_connect(IPPROTO_TCP, WEB, 80, 22, now=0.1)
    assert events.claim(IPPROTO_TCP, 40000, WEB, 80, now=0.2) == 11
    assert events.claim(IPPROTO_TCP, 40001, WEB, 80, now=0.2) == 22
    assert events.claim(IPPROTO_TCP, 40002, WEB, 80, now=0.2) is None
    assert len(events) == 0


def test_protocol_and_remote_must_match() -> None:
    events = ConnectEvents()
    events.add_connect(IPPROTO_TCP, WEB, 80, 11, now=0.0)
    assert events.claim(IPPROTO_UDP, 40000, WEB, 80, now=0.0) is None
    assert events.claim(IPPROTO_TCP, 40000, WEB, 443, now=0.0) is None
    assert events.claim(IPPROTO_TCP, 40000, bytes([198, 18, 0, 11]), 80, now=0.0) is None


def test_exact_flow_events_win_and_consume_the_matching_connect() -> None:
    events = ConnectEvents()
    events.add_connect(IPPROTO_UDP, WEB, 53, 11, now=0.0)
    events.add_connect(IPPROTO_UDP, WEB, 53, 22, now=0.0)
    events.add_flow(IPPROTO_UDP, 5001, WEB, 53, 22, now=0.0)
    assert events.claim(IPPROTO_UDP, 5001, WEB, 53, now=0.0) == 22
    assert events.claim(IPPROTO_UDP, 5000, WEB, 53, now=0.0) == 11
    assert len(events) == 0


def test_events_of_several_processes_for_one_remote_are_confirmed_by_their_owner() -> None:
    events = ConnectEvents()
    events.add_connect(IPPROTO_TCP, WEB, 80, 11, now=0.0)
    events.add_connect(IPPROTO_TCP, WEB, 80, 22, now=0.0)
    owners = {40000: 22, 40001: 11}
    assert events.claim(IPPROTO_TCP, 40000, WEB, 80, 0.1, confirm=lambda pid: owners[40000] == pid) == 22
    # Only pid 11's event is left: one candidate, no check needed unless the caller says ambiguous.
    assert events.claim(IPPROTO_TCP, 40001, WEB, 80, 0.1, confirm=lambda pid: False) == 11


def test_a_claim_nobody_confirms_takes_nothing_and_an_unknown_answer_keeps_arrival_order() -> None:
    events = ConnectEvents()
    events.add_connect(IPPROTO_TCP, WEB, 80, 11, now=0.0)
    events.add_connect(IPPROTO_TCP, WEB, 80, 22, now=0.0)
    assert events.claim(IPPROTO_TCP, 40000, WEB, 80, 0.1, confirm=lambda pid: False) is None
    assert len(events) == 2
    assert events.claim(IPPROTO_TCP, 40000, WEB, 80, 0.1, confirm=lambda pid: None) == 11
    assert events.claim(IPPROTO_TCP, 40001, WEB, 80, 0.1, confirm=lambda pid: False, ambiguous=True) is None
    assert events.waiting(IPPROTO_TCP, 40001, WEB, 80)
    assert events.claim(IPPROTO_TCP, 40001, WEB, 80, 0.1) == 22
    assert not events.waiting(IPPROTO_TCP, 40001, WEB, 80)


def test_stale_events_are_not_claimed_and_expire() -> None:
    events = ConnectEvents(max_age=2.0)
    events.add_connect(IPPROTO_TCP, WEB, 80, 11, now=0.0)
    events.add_flow(IPPROTO_UDP, 1, WEB, 80, 11, now=0.0)
    assert events.claim(IPPROTO_TCP, 40000, WEB, 80, now=5.0) is None
    events.add_connect(IPPROTO_TCP, WEB, 443, 11, now=0.0)
    events.expire(now=5.0)
    assert len(events) == 0


def test_a_flood_of_events_is_bounded() -> None:
    events = ConnectEvents()
    for i in range(5000):
        events.add_connect(IPPROTO_UDP, WEB, i, 1, now=0.0)
    assert len(events) == 4096 and events.dropped == 5000 - 4096


def test_a_connect_that_comes_after_its_flow_was_matched_exactly_waits_for_no_other_flow() -> None:
    events = ConnectEvents()
    events.add_flow(IPPROTO_UDP, 40001, WEB, 53, pid=1, now=0.0)  # FLOW ESTABLISHED first
    assert events.claim(IPPROTO_UDP, 40001, WEB, 53, now=0.0) == 1
    events.add_connect(IPPROTO_UDP, WEB, 53, pid=1, now=0.01)  # then its CONNECT
    assert events.claim(IPPROTO_UDP, 40002, WEB, 53, now=0.02) is None  # another app's flow: not pid 1's
    events.add_connect(IPPROTO_UDP, WEB, 53, pid=2, now=0.03)
    assert events.claim(IPPROTO_UDP, 40002, WEB, 53, now=0.03) == 2


def test_an_expected_late_connect_is_forgotten_after_the_event_age() -> None:
    events = ConnectEvents(max_age=2.0)
    events.expect_late(IPPROTO_UDP, WEB, 53, pid=1, now=0.0)
    events.add_connect(IPPROTO_UDP, WEB, 53, pid=1, now=3.0)  # a new connect of the same app, much later
    assert events.claim(IPPROTO_UDP, 40002, WEB, 53, now=3.0) == 1


def test_namespace_filter_keeps_only_this_namespace() -> None:
    inodes = {10: 111, 20: 222}
    ns = NamespaceFilter(own_inode=111, stat=inodes.get, clock=lambda: 0.0)
    assert ns.same_namespace(10)
    assert not ns.same_namespace(20)
    assert not ns.same_namespace(30)  # gone
    assert not ns.same_namespace(0)  # kernel context


def test_a_reused_pid_is_judged_by_its_new_process_not_the_old_answer() -> None:
    """A pid of an app of ours, later a container's process (other namespace): its events must not be
    taken for ours (one would be claimed by our next flow to the same remote); and a pid first seen as
    gone, later an app of ours: its events must not be ignored for ever."""
    inodes: dict[int, int] = {10: 111}
    now = [0.0]
    stats: list[int] = []

    def stat(pid: int) -> int | None:
        stats.append(pid)
        return inodes.get(pid)

    ns = NamespaceFilter(own_inode=111, stat=stat, clock=lambda: now[0])
    assert ns.same_namespace(10) and not ns.same_namespace(20)  # 20: exited before it was looked at
    assert ns.same_namespace(10) and stats == [10, 20]  # a burst of one process's events: one stat
    inodes[10], inodes[20] = 222, 111  # both pids handed to new processes
    now[0] = NAMESPACE_CACHE_TTL + 0.1
    assert not ns.same_namespace(10)
    assert ns.same_namespace(20)


def test_the_namespace_cache_stays_bounded() -> None:
    now = [0.0]
    ns = NamespaceFilter(own_inode=111, stat=lambda pid: 111, clock=lambda: now[0])
    for pid in range(1, 20_000):
        now[0] = pid * 0.001
        ns.same_namespace(pid)
    assert len(ns._cache) <= 4097 + int(NAMESPACE_CACHE_TTL / 0.001)


def test_own_namespace_is_recognised_for_real_processes() -> None:
    assert NamespaceFilter().same_namespace(os.getpid())
    assert netns_inode(os.getpid()) == netns_inode()


def test_exe_of_a_process_is_its_executable_and_cached() -> None:
    resolver = ExeResolver()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        exe = resolver.exe(child.pid)
        assert exe is not None and os.path.samefile(exe, sys.executable)
        resolver.exe(child.pid)
        assert resolver.misses == 1
    finally:
        child.kill()
        child.wait()
    assert resolver.exe(child.pid) is None


def test_os_lookup_finds_connected_tcp_and_bound_udp_sockets() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        lport = client.getsockname()[1]
        rport = listener.getsockname()[1]
        loop = bytes([127, 0, 0, 1])
        assert os_lookup_pid(IPPROTO_TCP, loop, lport, loop, rport) == os.getpid()
        uport = udp.getsockname()[1]
        assert os_lookup_pid(IPPROTO_UDP, loop, uport, WEB, 53) == os.getpid()
        assert os_lookup_pid(IPPROTO_UDP, loop, 1, WEB, 53) is None
        me = os.getpid()
        assert pid_owns_socket(me, IPPROTO_TCP, lport, loop, rport) is True
        assert pid_owns_socket(me, IPPROTO_TCP, lport, loop, rport + 1) is False, "another remote"
        assert pid_owns_socket(me, IPPROTO_UDP, uport, WEB, 53) is True, "unconnected UDP: any remote"
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert pid_owns_socket(child.pid, IPPROTO_TCP, lport, loop, rport) is False
        finally:
            child.kill()
            child.wait()
        assert pid_owns_socket(child.pid, IPPROTO_TCP, lport, loop, rport) is False, "gone"
    finally:
        client.close()
        listener.close()
        udp.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_process_start_time_is_read_right_whatever_its_name() -> None:
    # The command name may hold spaces and parentheses; the start time must still be field 22.
    from awg_split_tunnel.process.lookup import process_identity

    code = (
        "import time; open('/proc/self/comm', 'w').write('a) b (c'); print('ok', flush=True); time.sleep(5)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ok"
        parent, ticks = process_identity(child.pid)
        assert parent == os.getpid()
        created = psutil.Process(child.pid).create_time()
        assert abs(ticks / os.sysconf("SC_CLK_TCK") + psutil.boot_time() - created) < 0.05
        assert ExeResolver().exe(child.pid) == psutil.Process(child.pid).exe()
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ancestors_are_the_living_parents_exe_paths_nearest_first() -> None:
    # This process starts a child interpreter, which starts a grandchild that sleeps.
    code = (
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)']); "
        "print(g.pid, flush=True); g.wait()"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        resolver = ExeResolver()
        chain = resolver.ancestors(grandchild)
        assert chain[:2] == (psutil.Process(child.pid).exe(), psutil.Process().exe())
        assert chain[1:] == resolver.ancestors(child.pid)
        assert resolver.ancestors(grandchild) is chain  # cached by (pid, start time)
    finally:
        child.kill()
        child.wait()


class _FakeProcesses(ExeResolver):
    """An ExeResolver over a made-up process table: pid → (parent pid, start time), pid → exe."""

    def __init__(self, exes: dict[int, str]) -> None:
        super().__init__()
        self.exes = exes

    def _exe(self, pid: int, started: float) -> str:
        return self.exes[pid]


def test_a_parent_younger_than_its_child_is_a_reused_pid_and_ends_the_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from awg_split_tunnel.process import lookup

    # pid 30's parent 20 started before it (its real parent); 20's parent pid 10 now belongs to a
    # process started after 20 (the real parent exited and its pid was reused).
    identities = {30: (20, 300.0), 20: (10, 200.0), 10: (1, 250.0)}

    def identity(pid: int) -> tuple[int, float]:
        if pid not in identities:
            raise ProcessLookupError(pid)
        return identities[pid]

    monkeypatch.setattr(lookup, "process_identity", identity)
    exes = {20: "/usr/bin/launcher", 10: "/usr/bin/unrelated"}
    assert _FakeProcesses(exes).ancestors(30) == ("/usr/bin/launcher",)
    identities[10] = (1, 100.0)  # had it been older, it would be the grandparent
    assert _FakeProcesses(exes).ancestors(30) == ("/usr/bin/launcher", "/usr/bin/unrelated")


def test_a_gone_process_has_no_ancestors() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert ExeResolver().ancestors(child.pid) == ()
