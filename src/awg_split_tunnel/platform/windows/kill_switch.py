"""The Windows kill switch: `block` and `drop` apps stay off the network when the daemon is gone.

WinDivert fails open (docs/WINDOWS.md): when the daemon dies its filters go and every packet flows
directly. So the apps whose rule says `block` or `drop` get, in a sublayer of our own (WFP, ALE connect
and accept layers, IPv4 and IPv6, loopback excepted):

- a **persistent block** filter per app, added from a standard session: it outlives the daemon, a crash
  and a reboot, until deleted;
- a **permit** filter per app at a higher weight, added from a **dynamic** session the daemon holds:
  while the daemon runs the permit wins and the router decides each flow (tunnel, or dropped); when the
  process ends, however it ends, Windows deletes the permit and the block applies.

A clean stop deletes both (and the sublayer and provider); `awg-split-tunnel cleanup` deletes what a
dead daemon left; a start covers its apps first, then deletes what an earlier run left for other apps.

WFP names an app by its full path (``FWPM_CONDITION_ALE_APP_ID``), rules by patterns. The apps covered
(`blocked_apps`) are therefore: every rule whose pattern is a full path (no wildcard), and every running
or recently seen executable whose decision (first matching rule, or the default) has a `block` or `drop`
fallback; `refresh` re-reads the running processes every `REFRESH_INTERVAL` seconds. An app that never
ran while the daemon was up is not covered after a crash (docs/WINDOWS.md, Kill switch: limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from awg_split_tunnel.core.policy import FallbackPolicy
from awg_split_tunnel.core.rule_engine import RuleEngine
from awg_split_tunnel.errors import AwgSplitTunnelError
from awg_split_tunnel.platform.windows.wfp import (
    ALE_LAYERS,
    Action,
    FilterEngine,
    FilterSession,
    FilterSpec,
    WfpError,
)
from awg_split_tunnel.process.matcher import PatternKind, Platform, normalise_path

log = logging.getLogger("awg_split_tunnel.platform")

PROVIDER_KEY = uuid.UUID("5d3c4a5e-7a1b-4b7e-9e43-1f0c2b6a9a01")
SUBLAYER_KEY = uuid.UUID("5d3c4a5e-7a1b-4b7e-9e43-1f0c2b6a9a02")
FILTER_NAMESPACE = uuid.UUID("5d3c4a5e-7a1b-4b7e-9e43-1f0c2b6a9a03")
"""Filter keys are uuid5(FILTER_NAMESPACE, action|layer|app): the same app gets the same keys in every
run, so a restart finds and replaces its own filters."""

SUBLAYER_WEIGHT = 0xFFFF
BLOCK_WEIGHT = 0
PERMIT_WEIGHT = 15
REFRESH_INTERVAL = 5.0
"""Seconds between looks at the running processes for new apps of `block`/`drop` rules."""

BLOCKING = frozenset({FallbackPolicy.BLOCK, FallbackPolicy.DROP})


def blocked_apps(engine: RuleEngine, seen: Iterable[str], *, exempt: Iterable[str] = ()) -> set[str]:
    """The executables to hold off the network after a crash: full-path rules and the `seen` executables
    whose decision has a `block` or `drop` fallback; never an `exempt` one (the daemon's own
    interpreter: blocking it would block the tunnels themselves)."""
    platform = engine.platform
    candidates = [
        pattern.source
        for pattern in engine.patterns
        if pattern.kind is PatternKind.PATH_GLOB and _is_plain_full_path(pattern.source, platform)
    ]
    candidates.extend(seen)
    skip = {normalise_path(path, platform) for path in exempt}
    apps: dict[str, str] = {}
    for path in candidates:
        key = normalise_path(path, platform)
        if key in apps or key in skip:
            continue
        if engine.match_uncached(path).fallback in BLOCKING:
            apps[key] = path
    return set(apps.values())


def _is_plain_full_path(source: str, platform: Platform) -> bool:
    if "*" in source or "?" in source:
        return False
    path = normalise_path(source, platform)
    if platform is Platform.WINDOWS:
        return (len(path) > 3 and path[1:3] == ":/") or path.startswith("//")
    return path.startswith("/")


def app_key(app: str) -> str:
    """One app, however its path is spelled (WFP compares app ids case-insensitively)."""
    return normalise_path(app, Platform.WINDOWS)


def filter_key(action: Action, layer: uuid.UUID, app: str) -> uuid.UUID:
    return uuid.uuid5(FILTER_NAMESPACE, f"{action.name}|{layer}|{app_key(app)}")


@dataclass(frozen=True, slots=True)
class _Pair:
    block: tuple[FilterSpec, ...]
    permit: tuple[FilterSpec, ...]


def _filters(app: str) -> _Pair:
    def spec(action: Action, layer: uuid.UUID, weight: int, persistent: bool) -> FilterSpec:
        return FilterSpec(
            key=filter_key(action, layer, app),
            name=f"awg-split-tunnel {action.name.lower()} {app}",
            layer=layer,
            sublayer=SUBLAYER_KEY,
            provider=PROVIDER_KEY,
            app_path=app,
            action=action,
            weight=weight,
            persistent=persistent,
        )

    return _Pair(
        tuple(spec(Action.BLOCK, layer, BLOCK_WEIGHT, True) for layer in ALE_LAYERS),
        tuple(spec(Action.PERMIT, layer, PERMIT_WEIGHT, False) for layer in ALE_LAYERS),
    )


class KillSwitch:
    """Persistent blocks with a dynamic permit for the apps of `block`/`drop` rules (module docstring)."""

    def __init__(self, engine: FilterEngine) -> None:
        self._engine = engine
        self._store: FilterSession | None = None
        self._permits: FilterSession | None = None
        self._apps: dict[str, str] = {}
        """The apps filtered now: `app_key` → the path as first given."""

    @property
    def apps(self) -> frozenset[str]:
        """The apps filtered now (their paths as given)."""
        return frozenset(self._apps.values())

    def start(self, apps: Iterable[str]) -> None:
        """Open the sessions, cover `apps`, then delete what an earlier run left for other apps (in this
        order: an app blocked by a dead daemon and still to be blocked is never let out meanwhile).
        WfpError when the Base Filtering Engine refuses (the daemon does not start: `block` would not
        hold)."""
        store = self._store = self._engine.open(dynamic=False)
        self._permits = self._engine.open(dynamic=True)
        with store.transaction():
            store.add_provider(PROVIDER_KEY, "awg-split-tunnel", persistent=True)
            store.add_sublayer(
                SUBLAYER_KEY, PROVIDER_KEY, "awg-split-tunnel kill switch", SUBLAYER_WEIGHT, persistent=True
            )
        leftovers = set(store.filter_keys(PROVIDER_KEY))
        self._apps = {}
        self.update(apps)
        ours = {spec.key for app in self.apps for spec in (*_filters(app).block, *_filters(app).permit)}
        with store.transaction():
            for key in leftovers - ours:
                store.delete_filter(key)

    def update(self, apps: Iterable[str]) -> None:
        """Filter exactly `apps` from now on: new apps get their permit first, then their block (never
        blocked while the daemon runs); apps no longer blocked lose both. An app whose file is gone is
        logged and skipped."""
        store, permits = self._store, self._permits
        if store is None or permits is None:
            return
        wanted: dict[str, str] = {}
        for app in apps:
            wanted.setdefault(app_key(app), app)
        for key in sorted(wanted.keys() - self._apps.keys()):
            app = wanted[key]
            pair = _filters(app)
            try:
                with permits.transaction():
                    for spec in pair.permit:
                        permits.add_filter(spec)
                with store.transaction():
                    for spec in pair.block:
                        store.add_filter(spec)
            except WfpError as exc:
                log.warning("[Kill switch] %s not covered: %s", app, exc)
                del wanted[key]
                continue
            log.info("[Kill switch] %s blocked while the daemon is not running", app)
        for key in sorted(self._apps.keys() - wanted.keys()):
            pair = _filters(self._apps[key])
            with store.transaction():
                for spec in pair.block:
                    store.delete_filter(spec.key)
            with permits.transaction():
                for spec in pair.permit:
                    permits.delete_filter(spec.key)
        self._apps = {key: self._apps.get(key, app) for key, app in wanted.items()}

    def stop(self, *, keep_blocks: bool) -> None:
        """Close the dynamic session (the permits go with it). `keep_blocks=False` (a clean stop) also
        deletes the blocks, the sublayer and the provider; True (a failure) leaves `block` apps blocked
        until the next start or `cleanup`."""
        permits, store = self._permits, self._store
        self._permits = self._store = None
        if permits is not None:
            permits.close()
        if store is not None:
            try:
                if not keep_blocks:
                    remove_kill_switch(store)
            finally:
                store.close()
        self._apps = {}


def remove_kill_switch(session: FilterSession) -> int:
    """Delete every filter of ours, the sublayer and the provider (`cleanup`); how many filters went."""
    with session.transaction():
        removed = _delete_filters(session)
        session.delete_sublayer(SUBLAYER_KEY)
        session.delete_provider(PROVIDER_KEY)
    return removed


def _delete_filters(session: FilterSession) -> int:
    keys = session.filter_keys(PROVIDER_KEY)
    for key in keys:
        session.delete_filter(key)
    return len(keys)


def running_executables() -> set[str]:
    """The full paths of the running processes' executables (those this process may read)."""
    import psutil

    paths: set[str] = set()
    for process in psutil.process_iter(["exe"]):
        exe = process.info.get("exe")
        if exe:
            paths.add(str(exe))
    return paths


def own_image() -> str:
    """The executable file of this process: psutil reads the real image, which in a venv on Windows is
    the base interpreter the venv's ``python.exe`` launcher started, not ``sys.executable``."""
    import psutil

    try:
        return psutil.Process().exe()
    except (psutil.Error, OSError):
        return sys.executable


def refresh_apps(
    kill_switch: KillSwitch,
    engine: RuleEngine,
    *,
    exempt: Iterable[str],
    executables: Callable[[], Iterable[str]] = running_executables,
) -> None:
    """Cover the `block`/`drop` apps running now, keeping those seen before (the rules permitting)."""
    seen = set(kill_switch.apps) | set(executables())
    kill_switch.update(blocked_apps(engine, seen, exempt=exempt))


class RunningKillSwitch:
    """The kill switch as the daemon runs it: started before the router, the apps refreshed every
    `interval` seconds and at each rule change, stopped last (blocks kept after a failure)."""

    def __init__(
        self,
        filters: FilterEngine,
        rules: RuleEngine,
        *,
        exempt: Iterable[str],
        executables: Callable[[], Iterable[str]] = running_executables,
        interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.switch = KillSwitch(filters)
        self._rules = rules
        self._exempt = tuple(exempt)
        self._executables = executables
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._start)
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever(), name="kill-switch")

    def _start(self) -> None:
        self.switch.start(blocked_apps(self._rules, self._executables(), exempt=self._exempt))

    async def refresh(self) -> None:
        await asyncio.to_thread(
            refresh_apps, self.switch, self._rules, exempt=self._exempt, executables=self._executables
        )

    async def rules_changed(self, rules: RuleEngine) -> None:
        self._rules = rules
        await self.refresh()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except (AwgSplitTunnelError, OSError) as exc:
                log.warning("[Kill switch] refreshing the apps failed: %s", exc)

    async def stop(self, *, keep_blocks: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.switch.stop, keep_blocks=keep_blocks)
        if keep_blocks:
            log.warning(
                "[Kill switch] block and drop apps stay blocked until the daemon starts again or "
                "`awg-split-tunnel cleanup`"
            )


def windows_filter_engine() -> FilterEngine:
    from awg_split_tunnel.platform.windows.wfp import WfpEngine

    return WfpEngine()


def cleanup_kill_switch(filters: FilterEngine | None = None) -> int:
    """`awg-split-tunnel cleanup` on Windows: delete what a dead daemon left; how many filters went."""
    session = (filters or windows_filter_engine()).open(dynamic=False)
    try:
        return remove_kill_switch(session)
    finally:
        session.close()
