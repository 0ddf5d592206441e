"""A test app: asks the lab's web server which address it sees, and prints it.

Usage: ``APP [--udp] [-6] [--host ADDR] [--port N] [--timeout S] [--delay S]`` where APP is a copy of
the Python interpreter under the app's name running this file (or ``python -m
awg_split_tunnel.lab.app_client``). Output on success: line 1 the IP the server saw, line 2 its
``ip:port``. Standard library only, so that a copied interpreter starts it quickly.

Exit codes: 0 answered, 2 usage, 3 timed out, 4 connection refused/unreachable, 5 unexpected answer.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

EXIT_OK = 0
EXIT_TIMEOUT = 3
EXIT_UNREACHABLE = 4
EXIT_BAD_ANSWER = 5

DEFAULT_HOST_V4 = "198.18.0.10"
DEFAULT_HOST_V6 = "2001:2::10"


def ask_tcp(host: str, port: int, timeout: float) -> tuple[str, str]:
    """GET / over TCP; return ``(ip, ip:port)`` from the body."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"unexpected answer: {head[:80]!r}")
    return _parse_lines(body)


def ask_udp(host: str, port: int, timeout: float) -> tuple[str, str]:
    """One datagram to the UDP echo; return ``(ip, ip:port)`` from the reply's first line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        payload = b"app-client-probe"
        sock.send(payload)
        reply = sock.recv(65535)
    first, _, rest = reply.partition(b"\n")
    if rest != payload:
        raise ValueError(f"unexpected echo: {reply[:80]!r}")
    ip_port = first.decode()
    ip = ip_port.rsplit(":", 1)[0].strip("[]")
    return ip, ip_port


def _parse_lines(body: bytes) -> tuple[str, str]:
    lines = body.decode(errors="replace").splitlines()
    if len(lines) < 2:
        raise ValueError(f"unexpected body: {body[:80]!r}")
    return lines[0], lines[1]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, ask the server, print what it saw; the exit code says how it went."""
    parser = argparse.ArgumentParser(description="Ask the lab web server which address it sees.")
    parser.add_argument("--udp", action="store_true", help="use the UDP echo instead of HTTP")
    parser.add_argument("-6", dest="v6", action="store_true", help="use IPv6")
    parser.add_argument("--host", help="server address (default: the lab web server)")
    parser.add_argument("--port", type=int, help="server port (default 80, or 7 with --udp)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before giving up")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before connecting")
    args = parser.parse_args(argv)
    host = args.host or (DEFAULT_HOST_V6 if args.v6 else DEFAULT_HOST_V4)
    port = args.port or (7 if args.udp else 80)
    if args.delay:
        time.sleep(args.delay)
    try:
        ip, ip_port = (ask_udp if args.udp else ask_tcp)(host, port, args.timeout)
    except TimeoutError:
        print(f"timed out after {args.timeout}s talking to {host}:{port}", file=sys.stderr)
        return EXIT_TIMEOUT
    except OSError as exc:
        print(f"cannot reach {host}:{port}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_ANSWER
    print(ip)
    print(ip_port, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
