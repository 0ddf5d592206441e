"""The Windows Filtering Platform through ctypes (``fwpuclnt.dll``): the few management calls the kill
switch needs, behind `FilterEngine` so that the kill switch runs on Linux against a fake.

Objects and lifetimes (docs/WINDOWS.md, Kill switch): an object added from a session opened with
``FWPM_SESSION_FLAG_DYNAMIC`` is deleted when the session ends — `FwpmEngineClose0` or the process ending;
an object added with its ``*_FLAG_PERSISTENT`` flag stays until deleted, also across reboots. A
persistent filter needs a persistent sublayer and provider.

Struct layouts follow ``fwptypes.h``/``fwpmtypes.h`` as wireguard-windows declares them
(``tunnel/firewall/types_windows*.go``); ctypes lays them out with the C padding rules.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from awg_split_tunnel.errors import AwgSplitTunnelError

# -- WFP's own names (fwpmu.h, fwptypes.h, fwpmtypes.h) -----------------------------------------------------

FWPM_LAYER_ALE_AUTH_CONNECT_V4 = uuid.UUID("c38d57d1-05a7-4c33-904f-7fbceee60e82")
FWPM_LAYER_ALE_AUTH_CONNECT_V6 = uuid.UUID("4a72393b-319f-44bc-84c3-ba54dcb3b6b4")
FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4 = uuid.UUID("e1cd9fe7-f4b5-4273-96c0-592e487b8650")
FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6 = uuid.UUID("a3b42c97-9f04-4672-b87e-cee9c483257f")
ALE_LAYERS = (
    FWPM_LAYER_ALE_AUTH_CONNECT_V4,
    FWPM_LAYER_ALE_AUTH_CONNECT_V6,
    FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
    FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6,
)
"""Where an app's connections (outbound connect, inbound accept; IPv4 and IPv6) are authorised."""

FWPM_CONDITION_ALE_APP_ID = uuid.UUID("d78e1e87-8644-4ea5-9437-d809ecefc971")
FWPM_CONDITION_FLAGS = uuid.UUID("632ce23b-5167-435c-86d7-e903684aa80c")
FWP_CONDITION_FLAG_IS_LOOPBACK = 0x1

FWP_EMPTY = 0
FWP_UINT8 = 1
FWP_UINT32 = 3
FWP_BYTE_BLOB_TYPE = 12
FWP_MATCH_EQUAL = 0
FWP_MATCH_FLAGS_NONE_SET = 8
FWP_ACTION_FLAG_TERMINATING = 0x1000
FWP_ACTION_BLOCK = 0x1 | FWP_ACTION_FLAG_TERMINATING
FWP_ACTION_PERMIT = 0x2 | FWP_ACTION_FLAG_TERMINATING
FWPM_SESSION_FLAG_DYNAMIC = 0x1
FWPM_PROVIDER_FLAG_PERSISTENT = 0x1
FWPM_SUBLAYER_FLAG_PERSISTENT = 0x1
FWPM_FILTER_FLAG_PERSISTENT = 0x1
RPC_C_AUTHN_WINNT = 10
FWP_FILTER_ENUM_OVERLAPPING = 1

FWP_E_ALREADY_EXISTS = 0x80320009
FWP_E_FILTER_NOT_FOUND = 0x80320003
FWP_E_SUBLAYER_NOT_FOUND = 0x80320007
FWP_E_PROVIDER_NOT_FOUND = 0x80320005
FWP_E_IN_USE = 0x8032000A
FWP_E_LIFETIME_MISMATCH = 0x80320016
ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
EPT_S_NOT_REGISTERED = 1753
NOT_FOUND = frozenset({FWP_E_FILTER_NOT_FOUND, FWP_E_SUBLAYER_NOT_FOUND, FWP_E_PROVIDER_NOT_FOUND})

WFP_ERRORS = {
    ERROR_ACCESS_DENIED: "not running as Administrator",
    EPT_S_NOT_REGISTERED: "the Base Filtering Engine (BFE) service is not running",
    ERROR_FILE_NOT_FOUND: "the program file does not exist",
    FWP_E_ALREADY_EXISTS: "an object with this key exists already",
    FWP_E_IN_USE: "the object is still in use by filters",
    FWP_E_LIFETIME_MISMATCH: "a persistent object cannot refer to a non-persistent one",
}


class WfpError(AwgSplitTunnelError):
    """A WFP call failed; `code` is its Win32/FWP_E_* result."""

    def __init__(self, call: str, code: int) -> None:
        self.call = call
        self.code = code
        meaning = WFP_ERRORS.get(code)
        super().__init__(f"{call} failed with 0x{code:08x}" + (f" ({meaning})" if meaning else ""))


class Action(enum.Enum):
    BLOCK = FWP_ACTION_BLOCK
    PERMIT = FWP_ACTION_PERMIT


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One filter as the kill switch adds it: an app (its full path, turned into an app id by
    ``FwpmGetAppIdFromFileName0``) at one ALE layer, non-loopback traffic only."""

    key: uuid.UUID
    name: str
    layer: uuid.UUID
    sublayer: uuid.UUID
    provider: uuid.UUID
    app_path: str
    action: Action
    weight: int
    """0–15: the weight range within the sublayer (higher wins)."""
    persistent: bool


class FilterSession(Protocol):
    """One ``FwpmEngineOpen0`` handle: what is added through it lives as long as the session when the
    session is dynamic, until deleted when the object is persistent."""

    @property
    def dynamic(self) -> bool: ...

    def transaction(self) -> Any:
        """A context manager: everything inside commits together, or nothing on an exception."""

    def add_provider(self, key: uuid.UUID, name: str, *, persistent: bool) -> None: ...

    def add_sublayer(
        self, key: uuid.UUID, provider: uuid.UUID, name: str, weight: int, *, persistent: bool
    ) -> None: ...

    def add_filter(self, spec: FilterSpec) -> None: ...

    def delete_filter(self, key: uuid.UUID) -> None: ...

    def delete_sublayer(self, key: uuid.UUID) -> None: ...

    def delete_provider(self, key: uuid.UUID) -> None: ...

    def filter_keys(self, provider: uuid.UUID) -> list[uuid.UUID]:
        """The keys of every filter of `provider`, at the ALE layers (whoever added them)."""

    def close(self) -> None: ...


class FilterEngine(Protocol):
    def open(self, *, dynamic: bool) -> FilterSession: ...


# -- ctypes (Windows) -----------------------------------------------------------------------------------


class GUID(ctypes.Structure):
    _fields_ = (
        ("Data1", ctypes.c_uint32),
        ("Data2", ctypes.c_uint16),
        ("Data3", ctypes.c_uint16),
        ("Data4", ctypes.c_uint8 * 8),
    )

    @classmethod
    def of(cls, value: uuid.UUID) -> GUID:
        return cls.from_buffer_copy(value.bytes_le)

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(self))


class FWPM_DISPLAY_DATA0(ctypes.Structure):
    _fields_ = (("name", ctypes.c_wchar_p), ("description", ctypes.c_wchar_p))


class FWP_BYTE_BLOB(ctypes.Structure):
    _fields_ = (("size", ctypes.c_uint32), ("data", ctypes.POINTER(ctypes.c_uint8)))


class _FWP_VALUE_UNION(ctypes.Union):
    _fields_ = (
        ("uint8", ctypes.c_uint8),
        ("uint32", ctypes.c_uint32),
        ("byteBlob", ctypes.POINTER(FWP_BYTE_BLOB)),
        ("pointer", ctypes.c_void_p),
    )


class FWP_VALUE0(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint32), ("value", _FWP_VALUE_UNION))


class FWPM_FILTER_CONDITION0(ctypes.Structure):
    _fields_ = (("fieldKey", GUID), ("matchType", ctypes.c_uint32), ("conditionValue", FWP_VALUE0))


class FWPM_ACTION0(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint32), ("filterType", GUID))


class _FWPM_FILTER_CONTEXT(ctypes.Union):
    _fields_ = (("rawContext", ctypes.c_uint64), ("providerContextKey", GUID))


class FWPM_FILTER0(ctypes.Structure):
    _fields_ = (
        ("filterKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", ctypes.c_uint32),
        ("providerKey", ctypes.POINTER(GUID)),
        ("providerData", FWP_BYTE_BLOB),
        ("layerKey", GUID),
        ("subLayerKey", GUID),
        ("weight", FWP_VALUE0),
        ("numFilterConditions", ctypes.c_uint32),
        ("filterCondition", ctypes.POINTER(FWPM_FILTER_CONDITION0)),
        ("action", FWPM_ACTION0),
        ("context", _FWPM_FILTER_CONTEXT),
        ("reserved", ctypes.POINTER(GUID)),
        ("filterId", ctypes.c_uint64),
        ("effectiveWeight", FWP_VALUE0),
    )


class FWPM_SESSION0(ctypes.Structure):
    _fields_ = (
        ("sessionKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", ctypes.c_uint32),
        ("txnWaitTimeoutInMSec", ctypes.c_uint32),
        ("processId", ctypes.c_uint32),
        ("sid", ctypes.c_void_p),
        ("username", ctypes.c_wchar_p),
        ("kernelMode", ctypes.c_int32),
    )


class FWPM_PROVIDER0(ctypes.Structure):
    _fields_ = (
        ("providerKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", ctypes.c_uint32),
        ("providerData", FWP_BYTE_BLOB),
        ("serviceName", ctypes.c_wchar_p),
    )


class FWPM_SUBLAYER0(ctypes.Structure):
    _fields_ = (
        ("subLayerKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", ctypes.c_uint32),
        ("providerKey", ctypes.POINTER(GUID)),
        ("providerData", FWP_BYTE_BLOB),
        ("weight", ctypes.c_uint16),
    )


class FWPM_FILTER_ENUM_TEMPLATE0(ctypes.Structure):
    _fields_ = (
        ("providerKey", ctypes.POINTER(GUID)),
        ("layerKey", GUID),
        ("enumType", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("providerContextTemplate", ctypes.c_void_p),
        ("numFilterConditions", ctypes.c_uint32),
        ("filterCondition", ctypes.POINTER(FWPM_FILTER_CONDITION0)),
        ("actionMask", ctypes.c_uint32),
        ("calloutKey", ctypes.POINTER(GUID)),
    )


class WfpEngine:
    """`FilterEngine` on the real Base Filtering Engine (Windows, Administrator)."""

    def __init__(self, dll: Any = None) -> None:
        if dll is None:
            if sys.platform != "win32":
                raise WfpError("loading fwpuclnt.dll (Windows only)", ERROR_FILE_NOT_FOUND)
            dll = ctypes.WinDLL("fwpuclnt.dll")
        self._dll = dll

    def open(self, *, dynamic: bool) -> WfpSession:
        session = FWPM_SESSION0()
        session.flags = FWPM_SESSION_FLAG_DYNAMIC if dynamic else 0
        session.displayData.name = "awg-split-tunnel"
        handle = ctypes.c_void_p()
        _check(
            "FwpmEngineOpen0",
            self._dll.FwpmEngineOpen0(
                None, RPC_C_AUTHN_WINNT, None, ctypes.byref(session), ctypes.byref(handle)
            ),
        )
        return WfpSession(self._dll, handle, dynamic)


class WfpSession:
    def __init__(self, dll: Any, handle: ctypes.c_void_p, dynamic: bool) -> None:
        self._dll = dll
        self._handle = handle
        self._dynamic = dynamic

    @property
    def dynamic(self) -> bool:
        return self._dynamic

    @contextmanager
    def transaction(self) -> Iterator[None]:
        _check("FwpmTransactionBegin0", self._dll.FwpmTransactionBegin0(self._handle, 0))
        try:
            yield
        except BaseException:
            self._dll.FwpmTransactionAbort0(self._handle)
            raise
        _check("FwpmTransactionCommit0", self._dll.FwpmTransactionCommit0(self._handle))

    def add_provider(self, key: uuid.UUID, name: str, *, persistent: bool) -> None:
        provider = FWPM_PROVIDER0()
        provider.providerKey = GUID.of(key)
        provider.displayData.name = name
        provider.flags = FWPM_PROVIDER_FLAG_PERSISTENT if persistent else 0
        _check_added(
            "FwpmProviderAdd0", self._dll.FwpmProviderAdd0(self._handle, ctypes.byref(provider), None)
        )

    def add_sublayer(
        self, key: uuid.UUID, provider: uuid.UUID, name: str, weight: int, *, persistent: bool
    ) -> None:
        provider_key = GUID.of(provider)
        sublayer = FWPM_SUBLAYER0()
        sublayer.subLayerKey = GUID.of(key)
        sublayer.displayData.name = name
        sublayer.flags = FWPM_SUBLAYER_FLAG_PERSISTENT if persistent else 0
        sublayer.providerKey = ctypes.pointer(provider_key)
        sublayer.weight = weight
        _check_added(
            "FwpmSubLayerAdd0", self._dll.FwpmSubLayerAdd0(self._handle, ctypes.byref(sublayer), None)
        )

    def add_filter(self, spec: FilterSpec) -> None:
        app_id = ctypes.POINTER(FWP_BYTE_BLOB)()
        _check(
            "FwpmGetAppIdFromFileName0",
            self._dll.FwpmGetAppIdFromFileName0(ctypes.c_wchar_p(spec.app_path), ctypes.byref(app_id)),
        )
        try:
            conditions = (FWPM_FILTER_CONDITION0 * 2)()
            conditions[0].fieldKey = GUID.of(FWPM_CONDITION_ALE_APP_ID)
            conditions[0].matchType = FWP_MATCH_EQUAL
            conditions[0].conditionValue.type = FWP_BYTE_BLOB_TYPE
            conditions[0].conditionValue.value.byteBlob = app_id
            # Loopback stays open: it reaches nothing beyond this machine (a blocked app's local services).
            conditions[1].fieldKey = GUID.of(FWPM_CONDITION_FLAGS)
            conditions[1].matchType = FWP_MATCH_FLAGS_NONE_SET
            conditions[1].conditionValue.type = FWP_UINT32
            conditions[1].conditionValue.value.uint32 = FWP_CONDITION_FLAG_IS_LOOPBACK
            provider_key = GUID.of(spec.provider)
            native = FWPM_FILTER0()
            native.filterKey = GUID.of(spec.key)
            native.displayData.name = spec.name
            native.flags = FWPM_FILTER_FLAG_PERSISTENT if spec.persistent else 0
            native.providerKey = ctypes.pointer(provider_key)
            native.layerKey = GUID.of(spec.layer)
            native.subLayerKey = GUID.of(spec.sublayer)
            native.weight.type = FWP_UINT8
            native.weight.value.uint8 = spec.weight
            native.numFilterConditions = 2
            native.filterCondition = conditions
            native.action.type = spec.action.value
            filter_id = ctypes.c_uint64()
            _check_added(
                "FwpmFilterAdd0",
                self._dll.FwpmFilterAdd0(self._handle, ctypes.byref(native), None, ctypes.byref(filter_id)),
            )
        finally:
            self._dll.FwpmFreeMemory0(ctypes.byref(app_id))

    def delete_filter(self, key: uuid.UUID) -> None:
        _check_deleted(
            "FwpmFilterDeleteByKey0",
            self._dll.FwpmFilterDeleteByKey0(self._handle, ctypes.byref(GUID.of(key))),
        )

    def delete_sublayer(self, key: uuid.UUID) -> None:
        _check_deleted(
            "FwpmSubLayerDeleteByKey0",
            self._dll.FwpmSubLayerDeleteByKey0(self._handle, ctypes.byref(GUID.of(key))),
        )

    def delete_provider(self, key: uuid.UUID) -> None:
        _check_deleted(
            "FwpmProviderDeleteByKey0",
            self._dll.FwpmProviderDeleteByKey0(self._handle, ctypes.byref(GUID.of(key))),
        )

    def filter_keys(self, provider: uuid.UUID) -> list[uuid.UUID]:
        provider_key = GUID.of(provider)
        keys: list[uuid.UUID] = []
        for layer in ALE_LAYERS:
            template = FWPM_FILTER_ENUM_TEMPLATE0()
            template.providerKey = ctypes.pointer(provider_key)
            template.layerKey = GUID.of(layer)
            template.enumType = FWP_FILTER_ENUM_OVERLAPPING
            template.actionMask = 0xFFFFFFFF
            enum_handle = ctypes.c_void_p()
            _check(
                "FwpmFilterCreateEnumHandle0",
                self._dll.FwpmFilterCreateEnumHandle0(
                    self._handle, ctypes.byref(template), ctypes.byref(enum_handle)
                ),
            )
            try:
                while True:
                    entries = ctypes.POINTER(ctypes.POINTER(FWPM_FILTER0))()
                    count = ctypes.c_uint32()
                    _check(
                        "FwpmFilterEnum0",
                        self._dll.FwpmFilterEnum0(
                            self._handle, enum_handle, 64, ctypes.byref(entries), ctypes.byref(count)
                        ),
                    )
                    try:
                        keys.extend(entries[i].contents.filterKey.uuid() for i in range(count.value))
                    finally:
                        if entries:
                            self._dll.FwpmFreeMemory0(ctypes.byref(entries))
                    if count.value < 64:
                        break
            finally:
                self._dll.FwpmFilterDestroyEnumHandle0(self._handle, enum_handle)
        return keys

    def close(self) -> None:
        if self._handle:
            self._dll.FwpmEngineClose0(self._handle)
            self._handle = ctypes.c_void_p()


def _check(call: str, result: int) -> None:
    if result:
        raise WfpError(call, result & 0xFFFFFFFF)


def _check_added(call: str, result: int) -> None:
    """Adding what exists already (a second start after a crash) is not an error."""
    if result and (result & 0xFFFFFFFF) != FWP_E_ALREADY_EXISTS:
        raise WfpError(call, result & 0xFFFFFFFF)


def _check_deleted(call: str, result: int) -> None:
    if result and (result & 0xFFFFFFFF) not in NOT_FOUND:
        raise WfpError(call, result & 0xFFFFFFFF)
