"""The lab's DNS: a server that tells each asker the address it saw, and a stub resolver on loopback.

``python -m awg_split_tunnel.lab.dns_server serve`` (ns web, port 53, UDP and TCP, IPv4 and IPv6):

- ``whoami.lab. TXT`` (and ``<anything>.whoami.lab.``, so that tests can ask names no cache holds): one
  string, the address the query came from (its tunnel address, its proxy's, or the client's own);
- ``big.lab. TXT``: the same first, then enough records that the answer never fits 512 bytes: over UDP
  without a larger EDNS size it comes back truncated (TC), as real servers do;
- ``server.lab. TXT`` (and ``<anything>.server.lab.``): the server's own name (``--name``, default
  ``web``), so that a test tells which of the lab's servers answered;
- anything else: NXDOMAIN.

``python -m awg_split_tunnel.lab.dns_server stub --listen 127.0.0.53 --upstream 198.18.0.10`` (ns client):
a local resolver as systemd-resolved or dnsmasq is for apps — it forwards each query as it is (UDP over
UDP, TCP over TCP) from its own sockets, so the upstream sees the stub's address. Every query it forwards
is logged to stdout as ``forwarded NAME``.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

if TYPE_CHECKING:
    from awg_split_tunnel.lab.servers import LabServer
    from awg_split_tunnel.lab.topology import Lab

DNS_PORT = 53
WHOAMI = "whoami.lab."
BIG = "big.lab."
SERVER = "server.lab."
BIG_RECORDS = 12
"""Records of ``big.lab.`` besides the first: 12 x ~70 bytes, well past 512."""
STUB_ADDRESS = "127.0.0.53"


def answer(wire: bytes, source: str, max_size: int | None, server_name: str = "web") -> bytes | None:
    """The answer of server ``server_name`` to a query from ``source``; None for what is not a query.
    ``max_size`` (UDP) truncates an answer that does not fit the asker's size."""
    try:
        query = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return None
    if query.flags & dns.flags.QR or len(query.question) != 1:
        return None
    response = dns.message.make_response(query)
    question = query.question[0]
    name = question.name.to_text().lower()
    for known in (WHOAMI, SERVER):
        if name.endswith("." + known):
            name = known
    if name == SERVER and question.rdtype == dns.rdatatype.TXT:
        response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "TXT", f'"{server_name}"'))
    elif name in (WHOAMI, BIG) and question.rdtype == dns.rdatatype.TXT:
        texts = [source]
        if name == BIG:
            texts += [f"record {i:02d} " + "x" * 60 for i in range(BIG_RECORDS)]
        rrset = dns.rrset.from_text(question.name, 60, "IN", "TXT", *(f'"{text}"' for text in texts))
        response.answer.append(rrset)
    elif name not in (WHOAMI, BIG, SERVER):
        response.set_rcode(dns.rcode.NXDOMAIN)
    if max_size is not None:
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return bytes(response.to_wire(max_size=limit))
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
    return bytes(response.to_wire())


def _source(address: Any) -> str:
    return str(address[0]).removeprefix("::ffff:")


class _Udp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.reply(data, self.client_address, tcp=False)  # type: ignore[attr-defined]
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _Tcp(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while True:
            header = self.rfile.read(2)
            if len(header) < 2:
                return
            data = self.rfile.read(struct.unpack("!H", header)[0])
            reply = self.server.reply(data, self.client_address, tcp=True)  # type: ignore[attr-defined]
            if reply is None:
                return
            self.wfile.write(struct.pack("!H", len(reply)) + reply)


def _servers(address: str, reply: Any) -> list[socketserver.BaseServer]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    class Udp(socketserver.ThreadingUDPServer):
        address_family = family
        allow_reuse_address = True

    class Tcp(socketserver.ThreadingTCPServer):
        address_family = family
        allow_reuse_address = True
        daemon_threads = True

    servers: list[socketserver.BaseServer] = [Udp((address, DNS_PORT), _Udp), Tcp((address, DNS_PORT), _Tcp)]
    for server in servers:
        server.reply = reply  # type: ignore[attr-defined]
    return servers


def serve(addresses: Sequence[str], name: str = "web") -> list[socketserver.BaseServer]:
    def reply(data: bytes, client: Any, *, tcp: bool) -> bytes | None:
        return answer(data, _source(client), None if tcp else 512, name)

    return [server for address in addresses for server in _servers(address, reply)]


def stub(listen: str, upstream: str) -> list[socketserver.BaseServer]:
    family = socket.AF_INET6 if ":" in upstream else socket.AF_INET

    def reply(data: bytes, client: Any, *, tcp: bool) -> bytes | None:
        try:
            name = dns.message.from_wire(data).question[0].name.to_text()
        except (dns.exception.DNSException, ValueError, IndexError):
            return None
        print(f"forwarded {name}", flush=True)
        with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as sock:
            sock.settimeout(3.0)
            try:
                sock.connect((upstream, DNS_PORT))
                if not tcp:
                    sock.send(data)
                    return sock.recv(65535)
                sock.sendall(struct.pack("!H", len(data)) + data)
                stream = sock.makefile("rb")
                length = struct.unpack("!H", stream.read(2))[0]
                return bytes(stream.read(length))
            except (OSError, struct.error):
                return None

    return _servers(listen, reply)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="mode", required=True)
    server = sub.add_parser("serve")
    server.add_argument("--listen", action="append", default=None)
    server.add_argument("--name", default="web")
    resolver = sub.add_parser("stub")
    resolver.add_argument("--listen", default=STUB_ADDRESS)
    resolver.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    # The server listens dual-stack on [::] by default: IPv4 askers too.
    if args.mode == "serve":
        servers = serve(args.listen or ["::"], args.name)
    else:
        servers = stub(args.listen, args.upstream)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    for thread in threads:
        thread.join()
    return 0


# -- starting them in the lab ---------------------------------------------------------------------------


def ask(lab: Lab, host: str, server: str, name: str = WHOAMI, *, tcp: bool = False) -> str | None:
    """Ask ``server`` for ``name`` TXT from ns ``host`` (test process, not an app); the first string."""
    query = dns.message.make_query(name, "TXT")
    wire = query.to_wire()
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with lab.socket(host, family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect((server, DNS_PORT))
            if tcp:
                sock.sendall(struct.pack("!H", len(wire)) + wire)
                data = sock.recv(65535)[2:]
            else:
                sock.send(wire)
                data = sock.recv(65535)
            response = dns.message.from_wire(data)
        except (OSError, dns.exception.DNSException):
            return None
    for rrset in response.answer:
        for rdata in rrset:
            return b"".join(rdata.strings).decode()
    return None


def start_dns(lab: Lab, host: str | None = None, listen: str | None = None, name: str = "web") -> LabServer:
    """The lab's DNS server in ns web (198.18.0.10 / 2001:2::10, port 53); or server ``name`` in ns
    ``host`` on ``listen`` (e.g. behind a tunnel, at the tunnel's far end), asked from there when ready."""
    from awg_split_tunnel.lab.servers import LabServer
    from awg_split_tunnel.lab.topology import CLIENT, WEB, WEB_IP, python_path

    argv = [sys.executable, "-m", "awg_split_tunnel.lab.dns_server", "serve", "--name", name]
    if listen is not None:
        argv += ["--listen", listen]
    asker, address = (CLIENT, WEB_IP) if listen is None else (host or WEB, listen)
    return LabServer(
        lab,
        f"dns-{name}",
        host or WEB,
        argv,
        lambda: ask(lab, asker, address) is not None,
        env={"PYTHONPATH": python_path()},
    ).start()


def start_dns_stub(
    lab: Lab, upstream: str, exe: str = "lab-resolver", listen: str = STUB_ADDRESS
) -> LabServer:
    """A local resolver on ``listen`` in ns client forwarding to ``upstream``, run as test app ``exe``
    (so that rules can name it)."""
    from awg_split_tunnel.lab.apps import app_path
    from awg_split_tunnel.lab.servers import LabServer
    from awg_split_tunnel.lab.topology import CLIENT, python_path

    argv = [str(app_path(lab, exe)), "-m", "awg_split_tunnel.lab.dns_server", "stub"]
    argv += ["--listen", listen, "--upstream", upstream]
    return LabServer(
        lab,
        f"stub-{exe}-{listen}",
        CLIENT,
        argv,
        lambda: ask(lab, CLIENT, listen) is not None,
        env={"PYTHONPATH": python_path()},
    ).start()


if __name__ == "__main__":
    sys.exit(main())
