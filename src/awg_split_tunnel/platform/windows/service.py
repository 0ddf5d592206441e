"""The Windows service that runs the daemon (docs/WINDOWS.md, Service): `awg-split-tunnel service
install|uninstall|start|stop`, Administrator.

- Installed as ``awg-split-tunnel``: LocalSystem, started at boot (``SERVICE_AUTO_START``), restarted by
  the Service Control Manager 1 s after a failure. Its command line is this interpreter running this
  module (``python -m awg_split_tunnel.platform.windows.service -c CONFIG``), which hands the process to
  the SCM through pywin32's ``servicemanager`` (no ``pythonservice.exe`` host, so a venv works).
- Stop and shutdown requests stop the daemon as Ctrl-C does in a console: divert handles closed, the kill
  switch removed. A daemon that fails ends the process with an error: the kill switch stays, the SCM
  restarts the service.
- The proxies receive the apps' connections reflected by the router as inbound connections from the
  original destination, which Windows Defender Firewall would refuse for an unknown program: install adds
  an inbound allow rule for this interpreter (``FIREWALL_RULE``), uninstall removes it.

pywin32 is imported only on Windows; `ServiceControl` is the seam its calls go through, so the install
logic runs on Linux against a fake.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from awg_split_tunnel.errors import AwgSplitTunnelError
from awg_split_tunnel.platform.windows.kill_switch import own_image

SERVICE_NAME = "awg-split-tunnel"
DISPLAY_NAME = "AWG Split Tunnel"
DESCRIPTION = "Multi-tunnel VPN client with per-process split tunnelling (awg-split-tunnel run)."
FIREWALL_RULE = "AWG Split Tunnel (reflected proxy connections)"
ACTIONS = ("install", "uninstall", "start", "stop")
RESTART_DELAY_MS = 1000
LOG_NAME = "daemon.log"


class ServiceError(AwgSplitTunnelError):
    """A service action failed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What `install` registers."""

    name: str
    display_name: str
    description: str
    command_line: str
    auto_start: bool
    account: str | None
    """None: LocalSystem."""
    restart_delay_ms: int


class ServiceControl(Protocol):
    """The Service Control Manager calls used here (pywin32 on Windows)."""

    def create(self, spec: ServiceSpec) -> None: ...

    def delete(self, name: str) -> None: ...

    def start(self, name: str) -> None: ...

    def stop(self, name: str) -> None:
        """Stop and wait until stopped; nothing when it is not running."""

    def exists(self, name: str) -> bool: ...


Run = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


def service_command_line(config: Path, python: str | None = None) -> str:
    """The service's binary path: this interpreter running this module with the config."""
    exe = python or sys.executable
    return f'"{exe}" -m awg_split_tunnel.platform.windows.service -c "{config}"'


def firewall_add(program: str) -> list[str]:
    return [
        "netsh", "advfirewall", "firewall", "add", "rule", f"name={FIREWALL_RULE}", "dir=in",
        "action=allow", f"program={program}", "enable=yes", "profile=any",
    ]  # fmt: skip


def firewall_delete() -> list[str]:
    return ["netsh", "advfirewall", "firewall", "delete", "rule", f"name={FIREWALL_RULE}"]


def service_action(
    action: str,
    config: Path,
    *,
    control: ServiceControl | None = None,
    run: Run = _run,
    program: str | None = None,
) -> str:
    """Carry out `action` (one of ACTIONS) and say what was done; ServiceError on failure. `program` is
    the executable the firewall rule allows (default: the image of this very process, which in a venv is
    the base interpreter the venv's launcher started)."""
    if action not in ACTIONS:
        raise ServiceError(f"unknown service action {action!r} (known: {', '.join(ACTIONS)})")
    scm = control or Pywin32ServiceControl()
    try:
        if action == "install":
            return _install(scm, config.resolve(), run, program or own_image())
        if action == "uninstall":
            return _uninstall(scm, run)
        if action == "start":
            scm.start(SERVICE_NAME)
            return f"service {SERVICE_NAME} started"
        scm.stop(SERVICE_NAME)
        return f"service {SERVICE_NAME} stopped"
    except ServiceError:
        raise
    except Exception as exc:  # pywin32 raises pywintypes.error (winerror, function, message)
        raise ServiceError(f"service {action} failed: {_describe(exc)}") from None


def _install(scm: ServiceControl, config: Path, run: Run, program: str) -> str:
    if scm.exists(SERVICE_NAME):
        raise ServiceError(f"service {SERVICE_NAME} is installed already (uninstall it first)")
    scm.create(
        ServiceSpec(
            SERVICE_NAME,
            DISPLAY_NAME,
            DESCRIPTION,
            service_command_line(config),
            auto_start=True,
            account=None,
            restart_delay_ms=RESTART_DELAY_MS,
        )
    )
    result = run(firewall_add(program))
    if result.returncode != 0:
        scm.delete(SERVICE_NAME)
        raise ServiceError(f"adding the firewall rule failed: {(result.stdout + result.stderr).strip()}")
    return f"service {SERVICE_NAME} installed (LocalSystem, starts at boot) with {config}"


def _uninstall(scm: ServiceControl, run: Run) -> str:
    if scm.exists(SERVICE_NAME):
        scm.stop(SERVICE_NAME)
        scm.delete(SERVICE_NAME)
    run(firewall_delete())  # absent after a failed install: nothing to report
    return f"service {SERVICE_NAME} removed"


def _describe(exc: Exception) -> str:
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    if len(args) == 3 and isinstance(args[0], int):
        return f"{args[1]}: {args[2]} (Windows error {args[0]})"
    return str(exc) or type(exc).__name__


# -- running as the service ------------------------------------------------------------------------------


class ServiceRunner:
    """The daemon inside the service: `run` on the service's thread until `stop` (from the SCM's
    thread) — the same stop path as Ctrl-C in a console."""

    def __init__(self, config: Path, run_daemon: Callable[..., int] | None = None) -> None:
        self.config = config
        self._run_daemon = run_daemon
        self._daemon: Any = None
        self._loop: Any = None
        self._stop_early = False

    def run(self) -> int:
        if self._run_daemon is None:
            from awg_split_tunnel.daemon import run_daemon as default_run

            self._run_daemon = default_run
        run_daemon = self._run_daemon
        # A service has no console: the log goes to the data folder (protected like the config).
        return int(run_daemon(self.config, log_file=self.config.parent / LOG_NAME, on_daemon=self._attach))

    def _attach(self, daemon: Any) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._daemon = daemon
        if self._stop_early:
            daemon.request_stop()

    def stop(self) -> None:
        daemon, loop = self._daemon, self._loop
        if daemon is None or loop is None:
            self._stop_early = True
            return
        loop.call_soon_threadsafe(daemon.request_stop)


def _config_from_argv(argv: Sequence[str]) -> Path:
    from awg_split_tunnel.core.config import default_config_path

    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return Path(argv[i + 1])
    return default_config_path()


if sys.platform == "win32":
    import servicemanager
    import win32service
    import win32serviceutil

    class Pywin32ServiceControl:
        """`ServiceControl` through pywin32."""

        def create(self, spec: ServiceSpec) -> None:
            scm = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
            try:
                handle = win32service.CreateService(
                    scm,
                    spec.name,
                    spec.display_name,
                    win32service.SERVICE_ALL_ACCESS,
                    win32service.SERVICE_WIN32_OWN_PROCESS,
                    win32service.SERVICE_AUTO_START if spec.auto_start else win32service.SERVICE_DEMAND_START,
                    win32service.SERVICE_ERROR_NORMAL,
                    spec.command_line,
                    None,
                    0,
                    None,
                    spec.account,
                    None,
                )
                try:
                    win32service.ChangeServiceConfig2(
                        handle, win32service.SERVICE_CONFIG_DESCRIPTION, spec.description
                    )
                    restart = (win32service.SC_ACTION_RESTART, spec.restart_delay_ms)
                    win32service.ChangeServiceConfig2(
                        handle,
                        win32service.SERVICE_CONFIG_FAILURE_ACTIONS,
                        {"ResetPeriod": 86400, "RebootMsg": None, "Command": None, "Actions": [restart] * 3},
                    )
                    win32service.ChangeServiceConfig2(
                        handle, win32service.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, True
                    )
                finally:
                    win32service.CloseServiceHandle(handle)
            finally:
                win32service.CloseServiceHandle(scm)

        def delete(self, name: str) -> None:
            win32serviceutil.RemoveService(name)

        def start(self, name: str) -> None:
            win32serviceutil.StartService(name)
            win32serviceutil.WaitForServiceStatus(name, win32service.SERVICE_RUNNING, 30)

        def stop(self, name: str) -> None:
            status = win32serviceutil.QueryServiceStatus(name)[1]
            if status != win32service.SERVICE_STOPPED:
                win32serviceutil.StopService(name)
                win32serviceutil.WaitForServiceStatus(name, win32service.SERVICE_STOPPED, 30)

        def exists(self, name: str) -> bool:
            try:
                win32serviceutil.QueryServiceStatus(name)
            except Exception:
                return False
            return True

    class AwgSplitTunnelService(win32serviceutil.ServiceFramework):  # type: ignore[misc,unused-ignore]
        """What the SCM talks to: stop and shutdown stop the daemon."""

        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self.runner = ServiceRunner(_config_from_argv(sys.argv))

        def SvcStop(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
            self.runner.stop()

        def SvcShutdown(self) -> None:
            self.SvcStop()

        def SvcDoRun(self) -> None:
            code = self.runner.run()
            if code != 0:
                servicemanager.LogErrorMsg(f"{SERVICE_NAME}: the daemon failed (exit {code})")
                # End with an error so that the SCM's failure actions restart the service.
                import os

                os._exit(code)

    def serve() -> None:
        """Entry point when the SCM starts the service's command line."""
        import os

        # No console: Python leaves the standard streams None, which logging and the status line write to.
        if sys.stdout is None:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        if sys.stderr is None:
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        servicemanager.Initialize()
        servicemanager.PrepareToHostSingle(AwgSplitTunnelService)
        servicemanager.StartServiceCtrlDispatcher()

else:

    class Pywin32ServiceControl:
        """pywin32 exists on Windows only."""

        def __init__(self) -> None:
            raise ServiceError("the Windows service is Windows only; on Linux use `systemd-unit`")

        def create(self, spec: ServiceSpec) -> None: ...

        def delete(self, name: str) -> None: ...

        def start(self, name: str) -> None: ...

        def stop(self, name: str) -> None: ...

        def exists(self, name: str) -> bool:
            return False

    def serve() -> None:
        raise ServiceError("the Windows service is Windows only")


if __name__ == "__main__":
    serve()
