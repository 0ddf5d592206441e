"""The project's exception hierarchy, organised by where an error is handled.

- ``ConfigError``: a user's configuration is wrong; shown to the user, never a traceback.
- ``ProtocolError``: a peer or server spoke wrongly; handled at the connection that saw it.
- ``TunnelError``: a tunnel cannot carry traffic (down, refused, unreachable).
"""

from __future__ import annotations


class AwgSplitTunnelError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(AwgSplitTunnelError):
    """A configuration problem, located by file, line and key where they are known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.reason = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file) if self.line is None else f"{self.file}:{self.line}")
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.key:
            where.append(f"key '{self.key}'")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason


class ProtocolError(AwgSplitTunnelError):
    """A peer, proxy or packet violated its protocol."""


class TunnelError(AwgSplitTunnelError):
    """A tunnel could not carry a flow (down, refused, unreachable, authentication failed)."""


SHOWN_TEXT_LIMIT = 120
"""At most this many characters of text a remote party sent go into an error message."""


def shown_text(text: str | bytes, limit: int = SHOWN_TEXT_LIMIT) -> str:
    """Text a server sent, made safe to put into an error message: bytes decoded as Latin-1, every
    non-printable character (control characters, escape sequences' ESC, line breaks) replaced by "?",
    and cut to at most `limit` characters (the last one "…" when cut)."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text[: limit + 1]).decode("latin-1")
    cut = text[: limit - 1] + "…" if len(text) > limit else text
    return "".join(c if c.isprintable() else "?" for c in cut)
