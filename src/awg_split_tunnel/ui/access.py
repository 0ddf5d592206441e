"""Who may use the dashboard (docs/DASHBOARD.md: Security), without I/O.

The daemon makes a secret token at each start; `awg-split-tunnel ui` prints the URL carrying it. The first
request with the token gets it as a cookie (HttpOnly, SameSite=Strict) and every later request must carry
that cookie. The Host header must name the loopback listener (a page of another site whose name resolves
to 127.0.0.1, DNS rebinding, is refused), and every change carries the CSRF token the page was served
with, in a header a cross-site form cannot set. No CORS header is ever sent.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from enum import Enum

COOKIE = "awg_split_tunnel_ui"
CSRF_HEADER = "X-CSRF-Token"
TOKEN_PARAMETER = "token"
SAFE_METHODS = frozenset({"GET", "HEAD"})


class Refusal(Enum):
    """Why a request is refused; the value is what the browser is told."""

    FOREIGN_HOST = "unknown Host: the dashboard answers only to its loopback address"
    NO_SESSION = "not signed in: open the address that `awg-split-tunnel ui` prints"
    NO_CSRF = "missing or wrong CSRF token: reload the dashboard"
    FOREIGN_ORIGIN = "cross-site request refused"


@dataclass(frozen=True, slots=True)
class Access:
    """The secrets of one daemon start and the names the listener answers to."""

    token: str
    csrf: str
    hosts: frozenset[str]

    @classmethod
    def create(cls, host: str, port: int) -> Access:
        """New secrets for a listener on loopback `host`:`port`."""
        token = secrets.token_urlsafe(32)
        csrf = hmac.new(token.encode(), b"csrf", hashlib.sha256).hexdigest()
        return cls(token, csrf, allowed_hosts(host, port))

    def url(self, host: str, port: int) -> str:
        """The address to open: it signs the browser in."""
        return f"http://{host_header(host, port)}/?{TOKEN_PARAMETER}={self.token}"

    def check(
        self, method: str, host: str | None, cookie: str | None, csrf: str | None, origin: str | None
    ) -> Refusal | None:
        """None when the request may go on; else why not."""
        if host is None or host.lower() not in self.hosts:
            return Refusal.FOREIGN_HOST
        if cookie is None or not hmac.compare_digest(cookie.encode(), self.token.encode()):
            return Refusal.NO_SESSION
        if method.upper() in SAFE_METHODS:
            return None
        if origin is not None and origin.lower().removeprefix("http://") not in self.hosts:
            return Refusal.FOREIGN_ORIGIN
        if csrf is None or not hmac.compare_digest(csrf.encode(), self.csrf.encode()):
            return Refusal.NO_CSRF
        return None

    def signs_in(self, host: str | None, token: str | None) -> bool:
        """Whether a request to the sign-in URL carries this start's token (to a known Host)."""
        if host is None or host.lower() not in self.hosts or token is None:
            return False
        return hmac.compare_digest(token.encode(), self.token.encode())


def host_header(host: str, port: int) -> str:
    """The Host header (and URL authority) of a listener: IPv6 in brackets."""
    is_v6 = ":" in host and ipaddress.ip_address(host).version == 6
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host headers the listener accepts: its own address, and `localhost` for the same port."""
    return frozenset({host_header(host, port).lower(), f"localhost:{port}"})
