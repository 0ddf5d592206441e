"""nftables through ``libnftables.so.1`` (Debian ``libnftables1``), loaded with ctypes.

One library call per batch: a whole table replaced in one ``run_cmd`` is one netlink transaction, applied
completely or not at all (0.08 ms a command, a 1000-statement batch ~5 ms; an ``nft`` process per change
costs ~2.3 ms). The Debian ``python3-nftables`` binding wraps the same calls but is not on PyPI.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from awg_split_tunnel.errors import AwgSplitTunnelError

LIBRARY = "libnftables.so.1"
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_HANDLE = 1 << 0
NFT_CTX_OUTPUT_JSON = 1 << 4


class NftablesError(AwgSplitTunnelError):
    """libnftables is missing or refused a command; the message carries nft's own explanation."""


class Nftables:
    """A libnftables context: ``run(text)`` applies a batch of nft commands and returns what nft printed.

    Output and errors are buffered inside the library (``nft_ctx_buffer_output/error``), so nothing is
    written to the process's stdout/stderr. Thread-safe by a lock (a context is not).
    """

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("nftables") or LIBRARY, use_errno=True)
        except OSError as exc:
            raise NftablesError(
                f"libnftables cannot load ({exc}); install it: apt-get install libnftables1"
            ) from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        self._lib = lib
        self._lock = threading.Lock()
        self._ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not self._ctx:
            raise NftablesError("libnftables could not create a context")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str, *, dry_run: bool = False) -> str:
        """Apply ``commands`` (nft syntax, one batch); return nft's output. NftablesError on refusal.

        ``dry_run``: parse and check against the kernel without committing (to probe what it supports).
        """
        lib = self._lib
        with self._lock:
            if not self._ctx:
                raise NftablesError("the nftables context is closed")
            lib.nft_ctx_set_dry_run(self._ctx, dry_run)
            try:
                code = lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
                output = (lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
                error = (lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            finally:
                lib.nft_ctx_set_dry_run(self._ctx, False)
        if code != 0:
            raise NftablesError(_first_error(error) or f"nft refused the commands (code {code})")
        return output

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> Nftables:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_error(text: str) -> str:
    """nft's error text is the message, then the offending line and a caret line: keep the message and
    the line it names (the caret line means nothing once joined)."""
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    kept = [line for line in lines if set(line.strip()) - {"^", "~"}]
    return " | ".join(kept[:2])
