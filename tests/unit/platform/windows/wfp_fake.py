"""A Base Filtering Engine in memory that keeps WFP's documented object lifetimes and arbitration
(docs/WINDOWS.md, Kill switch):

- an object added from a dynamic session is deleted when that session ends (closed, or its process
  ended); a persistent one stays until deleted, also across a reboot; any other stays until the BFE
  restarts (a reboot);
- a persistent filter needs a persistent sublayer and provider (FWP_E_LIFETIME_MISMATCH);
- a sublayer or provider still used is not deleted (FWP_E_IN_USE);
- a transaction commits everything or nothing;
- within one sublayer the matching filter of the highest weight decides.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from awg_split_tunnel.platform.windows.wfp import (
    FWP_E_IN_USE,
    FWP_E_LIFETIME_MISMATCH,
    FWP_E_PROVIDER_NOT_FOUND,
    FWP_E_SUBLAYER_NOT_FOUND,
    Action,
    FilterSpec,
    WfpError,
)


@dataclass
class _Object:
    persistent: bool
    session: int | None  # the dynamic session that owns it
    provider: uuid.UUID | None = None
    spec: FilterSpec | None = None


class FakeWfp:
    def __init__(self, *, missing_files: frozenset[str] = frozenset()) -> None:
        self.providers: dict[uuid.UUID, _Object] = {}
        self.sublayers: dict[uuid.UUID, _Object] = {}
        self.filters: dict[uuid.UUID, _Object] = {}
        self.open_sessions: set[int] = set()
        self.missing_files = {p.lower() for p in missing_files}
        self._next = 1
        self.on_change: Callable[[], None] | None = None
        """Called after every object added or deleted (to watch what an app gets meanwhile)."""

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def open(self, *, dynamic: bool) -> FakeSession:
        session = FakeSession(self, self._next, dynamic)
        self._next += 1
        self.open_sessions.add(session.id)
        return session

    def end_session(self, session_id: int) -> None:
        self.open_sessions.discard(session_id)
        for table in (self.filters, self.sublayers, self.providers):
            for key in [k for k, o in table.items() if o.session == session_id]:
                del table[key]

    def process_ended(self) -> None:
        """The daemon's process is gone (crash, kill): Windows ends every session it held."""
        for session_id in list(self.open_sessions):
            self.end_session(session_id)

    def reboot(self) -> None:
        self.process_ended()
        for table in (self.filters, self.sublayers, self.providers):
            for key in [k for k, o in table.items() if not o.persistent]:
                del table[key]

    def decision(self, app: str, layer: uuid.UUID) -> Action | None:
        """What our filters say about `app`'s non-loopback connection at `layer` (None: no filter)."""
        matching = [
            o.spec
            for o in self.filters.values()
            if o.spec is not None and o.spec.layer == layer and o.spec.app_path.lower() == app.lower()
        ]
        if not matching:
            return None
        return max(matching, key=lambda s: s.weight).action

    def snapshot(self) -> tuple[dict[uuid.UUID, _Object], ...]:
        return copy.deepcopy((self.providers, self.sublayers, self.filters))

    def restore(self, state: tuple[dict[uuid.UUID, _Object], ...]) -> None:
        self.providers, self.sublayers, self.filters = state


class FakeSession:
    def __init__(self, bfe: FakeWfp, session_id: int, dynamic: bool) -> None:
        self.bfe = bfe
        self.id = session_id
        self._dynamic = dynamic

    @property
    def dynamic(self) -> bool:
        return self._dynamic

    def _owner(self) -> int | None:
        return self.id if self._dynamic else None

    def _live(self) -> None:
        assert self.id in self.bfe.open_sessions, "call on a closed session"

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._live()
        state = self.bfe.snapshot()
        try:
            yield
        except BaseException:
            self.bfe.restore(state)
            raise

    def add_provider(self, key: uuid.UUID, name: str, *, persistent: bool) -> None:
        self._live()
        self.bfe.providers.setdefault(key, _Object(persistent, self._owner()))

    def add_sublayer(
        self, key: uuid.UUID, provider: uuid.UUID, name: str, weight: int, *, persistent: bool
    ) -> None:
        self._live()
        owner = self.bfe.providers.get(provider)
        if owner is None:
            raise WfpError("FwpmSubLayerAdd0", FWP_E_PROVIDER_NOT_FOUND)
        if persistent and not owner.persistent:
            raise WfpError("FwpmSubLayerAdd0", FWP_E_LIFETIME_MISMATCH)
        self.bfe.sublayers.setdefault(key, _Object(persistent, self._owner(), provider))

    def add_filter(self, spec: FilterSpec) -> None:
        self._live()
        if spec.app_path.lower() in self.bfe.missing_files:
            raise WfpError("FwpmGetAppIdFromFileName0", 2)
        sublayer = self.bfe.sublayers.get(spec.sublayer)
        if sublayer is None:
            raise WfpError("FwpmFilterAdd0", FWP_E_SUBLAYER_NOT_FOUND)
        provider = self.bfe.providers.get(spec.provider)
        if provider is None:
            raise WfpError("FwpmFilterAdd0", FWP_E_PROVIDER_NOT_FOUND)
        if spec.persistent and not (sublayer.persistent and provider.persistent):
            raise WfpError("FwpmFilterAdd0", FWP_E_LIFETIME_MISMATCH)
        self.bfe.filters.setdefault(spec.key, _Object(spec.persistent, self._owner(), spec.provider, spec))
        self.bfe.changed()

    def delete_filter(self, key: uuid.UUID) -> None:
        self._live()
        self.bfe.filters.pop(key, None)
        self.bfe.changed()

    def delete_sublayer(self, key: uuid.UUID) -> None:
        self._live()
        if any(o.spec is not None and o.spec.sublayer == key for o in self.bfe.filters.values()):
            raise WfpError("FwpmSubLayerDeleteByKey0", FWP_E_IN_USE)
        self.bfe.sublayers.pop(key, None)

    def delete_provider(self, key: uuid.UUID) -> None:
        self._live()
        if any(o.provider == key for o in (*self.bfe.sublayers.values(), *self.bfe.filters.values())):
            raise WfpError("FwpmProviderDeleteByKey0", FWP_E_IN_USE)
        self.bfe.providers.pop(key, None)

    def filter_keys(self, provider: uuid.UUID) -> list[uuid.UUID]:
        self._live()
        return [k for k, o in self.bfe.filters.items() if o.provider == provider]

    def close(self) -> None:
        if self._dynamic:
            self.bfe.end_session(self.id)
        else:
            self.bfe.open_sessions.discard(self.id)
