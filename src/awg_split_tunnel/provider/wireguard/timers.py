"""Timer values and per-peer timer deadlines (docs/PROTOCOL.md: Timers, Timer ranges).

Every value is a `Range` picked again at each use (AmneziaWG 3.x); the defaults are WireGuard's fixed
values, so with them every pick is the WireGuard constant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from awg_split_tunnel.provider.wireguard.value_range import Range

REKEY_AFTER_TIME = 120
REKEY_TIMEOUT = 5
REJECT_AFTER_TIME = 180
KEEPALIVE_TIMEOUT = 10
MAX_TIMER_HANDSHAKES = 18  # REKEY_ATTEMPT_TIME 90 s / REKEY_TIMEOUT 5 s
REKEY_TIMEOUT_JITTER_MAX = 0.333
UNDER_LOAD_AFTER_TIME = 1.0

Rng = random.Random | random.SystemRandom
# Range is frozen, so sharing these defaults is safe.
_REKEY_AFTER_TIME = Range(REKEY_AFTER_TIME, REKEY_AFTER_TIME)
_REKEY_TIMEOUT = Range(REKEY_TIMEOUT, REKEY_TIMEOUT)
_REJECT_AFTER_TIME = Range(REJECT_AFTER_TIME, REJECT_AFTER_TIME)
_KEEPALIVE_TIMEOUT = Range(KEEPALIVE_TIMEOUT, KEEPALIVE_TIMEOUT)
_MAX_TIMER_HANDSHAKES = Range(MAX_TIMER_HANDSHAKES, MAX_TIMER_HANDSHAKES)


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """Device-wide timer values in seconds (attempts for `max_handshake_attempts`)."""

    rekey_after_time: Range = _REKEY_AFTER_TIME
    rekey_timeout: Range = _REKEY_TIMEOUT
    reject_after_time: Range = _REJECT_AFTER_TIME
    keepalive_timeout: Range = _KEEPALIVE_TIMEOUT
    max_handshake_attempts: Range = _MAX_TIMER_HANDSHAKES
    jitter_max: float = REKEY_TIMEOUT_JITTER_MAX

    def jitter(self, rng: Rng) -> float:
        return rng.uniform(0.0, self.jitter_max) if self.jitter_max > 0 else 0.0

    def retransmit_delay(self, rng: Rng) -> float:
        """Delay before an unanswered initiation is sent again."""
        return self.rekey_timeout.pick(rng) + self.jitter(rng)

    def new_handshake_delay(self, rng: Rng) -> float:
        """Delay after sending data with no reply before a new handshake."""
        return self.keepalive_timeout.hi + self.rekey_timeout.pick(rng) + self.jitter(rng)

    def rekey_on_receive_age(self, rng: Rng) -> float:
        """Keypair age at which an initiator rekeys when receiving (WireGuard: 180 − 10 − 5 s)."""
        return max(0, self.reject_after_time.pick(rng) - self.keepalive_timeout.lo - self.rekey_timeout.lo)

    @property
    def reject_after(self) -> float:
        """Age after which a keypair is no longer used, either way."""
        return float(self.reject_after_time.hi)

    @property
    def min_initiation_gap(self) -> float:
        return float(self.rekey_timeout.lo)


@dataclass(slots=True)
class PeerTimers:
    """A peer's deadlines on the caller's monotonic clock (None = not armed)."""

    retransmit_handshake: float | None = None
    send_keepalive: float | None = None
    new_handshake: float | None = None
    zero_key_material: float | None = None
    persistent_keepalive: float | None = None
    handshake_attempts: int = 0
    max_attempts: int = MAX_TIMER_HANDSHAKES
    need_another_keepalive: bool = False
    sent_last_minute_handshake: bool = False

    def earliest(self) -> float | None:
        found: float | None = None
        for t in (
            self.retransmit_handshake,
            self.send_keepalive,
            self.new_handshake,
            self.zero_key_material,
            self.persistent_keepalive,
        ):
            if t is not None and (found is None or t < found):
                found = t
        return found

    def stop_all(self) -> None:
        self.retransmit_handshake = self.send_keepalive = self.new_handshake = None
        self.zero_key_material = self.persistent_keepalive = None
