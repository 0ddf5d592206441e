"""The `awg-split-tunnel` command line (docs/DESIGN.md: Command line).

Every command turns a `ConfigError` (or any error of ours) into one clear line on stderr and exit code 1:
the user never sees a traceback for bad input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from awg_split_tunnel.errors import AwgSplitTunnelError

if TYPE_CHECKING:
    from awg_split_tunnel.core.config import ConfigManager
    from awg_split_tunnel.platform.linux.systemd import SystemdService

app = typer.Typer(
    name="awg-split-tunnel",
    help="Multi-tunnel VPN client with per-process split tunnelling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
rule_app = typer.Typer(help="Edit the rules (saved to the YAML, comments kept).", no_args_is_help=True)
app.add_typer(rule_app, name="rule")
tunnel_app = typer.Typer(help="Manual control of the running daemon's tunnels.", no_args_is_help=True)
app.add_typer(tunnel_app, name="tunnel")
service_app = typer.Typer(
    help="Linux: run the daemon as a systemd service (restarted on failure).", no_args_is_help=True
)
app.add_typer(service_app, name="service")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $AWG_SPLIT_TUNNEL_CONFIG or the platform config dir).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


Part = str | tuple[str, str]
"""A piece of a printed line: literal text, or (literal text, style)."""


def _line(*parts: Part) -> Text:
    """A line whose text is shown exactly as given: tunnel ids, paths, patterns and messages from
    configs, users or servers are never read as rich markup (or emoji codes)."""
    return Text.assemble(*parts)


def _say(*parts: Part) -> None:
    out.print(_line(*parts))


def _cells(*values: object) -> list[Text]:
    """Table cells shown literally (see `_line`)."""
    return [Text(str(value)) for value in values]


def _fail(message: str) -> typer.Exit:
    err.print(_line(("error:", "bold red"), " ", message), soft_wrap=True)
    return typer.Exit(1)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Map our errors (and unreadable files) to one line on stderr and exit code 1."""
    try:
        yield
    except AwgSplitTunnelError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None


def _config_path(config: Path | None) -> Path:
    from awg_split_tunnel.core.config import default_config_path

    return config if config is not None else default_config_path()


def _manager(config: Path | None, *, missing_ok: bool = False) -> ConfigManager:
    from awg_split_tunnel.core.config import ConfigManager
    from awg_split_tunnel.platform.data_folder import data_folder, secret_protection

    manager = ConfigManager(_config_path(config), folder=data_folder(), secrets=secret_protection())
    manager.load(missing_ok=missing_ok)
    return manager


@contextmanager
def _editing(config: Path | None, *, missing_ok: bool = False) -> Iterator[ConfigManager]:
    """The config loaded under its edit lock, held until the change is written: two edits at once (two
    `rule add`s) wait for each other instead of the second being refused as changed on disk."""
    from awg_split_tunnel.core.config import ConfigManager
    from awg_split_tunnel.platform.data_folder import data_folder, secret_protection

    manager = ConfigManager(_config_path(config), folder=data_folder(), secrets=secret_protection())
    with manager.locked():
        manager.load(missing_ok=missing_ok)
        yield manager


@app.callback()
def _root() -> None:
    """Multi-tunnel VPN client with per-process split tunnelling."""


@app.command()
def version() -> None:
    """Print the version."""
    from awg_split_tunnel import __version__

    typer.echo(__version__)


# -- check / match --------------------------------------------------------------------------------------


def _tunnel_target(tunnel: object) -> str:
    from awg_split_tunnel.core.config import PacketTunnel, tunnel_wg_conf

    if isinstance(tunnel, PacketTunnel):
        conf = tunnel_wg_conf(tunnel)
        endpoints = ", ".join(str(p.endpoint) for p in conf.peers if p.endpoint is not None)
        source = tunnel.config_file if tunnel.config_file else "inline"
        return f"{endpoints or 'no endpoint'}  ({source})"
    server = getattr(tunnel, "server", "")
    user = getattr(tunnel, "username", None)
    return f"{user}@{server}" if user else str(server)


def _tunnel_notes(tunnel: object) -> str:
    from awg_split_tunnel.core.config import HttpTunnel, PacketTunnel, Socks5Tunnel, tunnel_wg_conf

    notes: list[str] = []
    if isinstance(tunnel, PacketTunnel):
        conf = tunnel_wg_conf(tunnel)
        notes.append(", ".join(str(a) for a in conf.interface.addresses) or "no address")
        if conf.interface.mtu:
            notes.append(f"mtu {conf.interface.mtu}")
        if conf.is_amneziawg:
            notes.append("obfuscated")
    elif isinstance(tunnel, Socks5Tunnel):
        notes.append("udp via associate" if tunnel.udp else "udp dropped")
    elif isinstance(tunnel, HttpTunnel):
        notes.append(f"udp {tunnel.udp}ped" if tunnel.udp == "drop" else "udp direct")
    if not getattr(tunnel, "lan_bypass", True):
        notes.append("no LAN bypass")
    return "; ".join(notes)


@app.command()
def check(config: ConfigOption = None) -> None:
    """Validate the config; print its tunnels and rules. Exit 1 with a clear error on bad input."""
    with _user_errors():
        from awg_split_tunnel.process.matcher import compile_pattern

        manager = _manager(config)
        cfg = manager.config
        tunnels = Table(title="Tunnels", title_justify="left")
        for column in ("id", "type", "server / endpoint", "notes"):
            tunnels.add_column(column)
        for t in cfg.tunnels:
            tunnels.add_row(*_cells(t.id, t.type, _tunnel_target(t), _tunnel_notes(t)))
        rules = Table(title="Rules (first match wins)", title_justify="left")
        for column in ("#", "process", "kind", "tunnel", "fallback"):
            rules.add_column(column)
        for i, r in enumerate(cfg.rules):
            kind = compile_pattern(r.process).kind.value.replace("_", " ")
            rules.add_row(*_cells(i, r.process, kind, r.tunnel, r.fallback.value))
        _say((str(manager.path), "bold"), ": OK")
        out.print(tunnels)
        out.print(rules)
        _say("Unmatched processes: ", (cfg.default, "bold"))


PlatformOption = Annotated[
    str | None,
    typer.Option(
        "--platform",
        help="Evaluate with windows or posix path semantics (default: this machine's).",
        show_default=False,
    ),
]


@app.command()
def match(
    process: Annotated[str, typer.Argument(help="An exe name or a full path.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
    platform: PlatformOption = None,
) -> None:
    """Dry run of the rule engine: which tunnel and policy PROCESS gets, and which rule decided."""
    with _user_errors():
        from awg_split_tunnel.core.routing import engine_from_config
        from awg_split_tunnel.process.matcher import Platform

        chosen: Platform | None = None
        if platform is not None:
            try:
                chosen = Platform(platform.lower())
            except ValueError:
                raise _fail(f"--platform must be 'windows' or 'posix', not {platform!r}") from None
        manager = _manager(config)
        cfg = manager.config
        decision = engine_from_config(cfg, chosen).match_uncached(process)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "tunnel": decision.tunnel,
                        "fallback": decision.fallback.value,
                        "rule_index": decision.rule_index,
                    }
                )
            )
            return
        _say("tunnel:   ", (decision.tunnel, "bold"))
        _say(f"fallback: {decision.fallback.value}")
        if decision.rule_index is None:
            _say("rule:     none matched; the default applies")
        else:
            rule = cfg.rules[decision.rule_index]
            _say(f"rule:     #{decision.rule_index}  {rule.process!r}")


# -- config editing ---------------------------------------------------------------------------------------


@app.command("import")
def import_conf(
    file: Annotated[Path, typer.Argument(help="A WireGuard/AmneziaWG .conf file.")],
    tunnel_id: Annotated[str | None, typer.Option("--id", help="Tunnel id (default: the file name).")] = None,
    config: ConfigOption = None,
) -> None:
    """Add a WireGuard/AmneziaWG tunnel from a .conf (copied next to the config, mode 0600)."""
    with _user_errors(), _editing(config, missing_ok=True) as manager:
        new_id = manager.import_conf(file, tunnel_id)
        kind = next(t.type for t in manager.config.tunnels if t.id == new_id)
    _say("added tunnel ", (new_id, "bold"), f" ({kind}) to {manager.path}")


@rule_app.command("list")
def rule_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the rules in order."""
    with _user_errors():
        cfg = _manager(config).config
        if as_json:
            rules = [
                {"index": i, "process": r.process, "tunnel": r.tunnel, "fallback": r.fallback.value}
                for i, r in enumerate(cfg.rules)
            ]
            typer.echo(json.dumps({"rules": rules, "default": cfg.default}))
            return
        table = Table()
        for column in ("#", "process", "tunnel", "fallback"):
            table.add_column(column)
        for i, r in enumerate(cfg.rules):
            table.add_row(*_cells(i, r.process, r.tunnel, r.fallback.value))
        out.print(table)
        _say("Unmatched processes: ", (cfg.default, "bold"))


@rule_app.command("add")
def rule_add(
    process: Annotated[
        str, typer.Argument(help="Pattern: exe name, *wildcard*, directory/, path glob, re:…")
    ],
    tunnel: Annotated[str, typer.Option("--tunnel", "-t", help="Tunnel id, or 'direct'.")],
    fallback: Annotated[str, typer.Option(help="allow_direct | block | drop")] = "allow_direct",
    index: Annotated[int | None, typer.Option(help="Insert before this rule (default: append).")] = None,
    config: ConfigOption = None,
) -> None:
    """Add a rule (first match wins, so order matters)."""
    with _user_errors(), _editing(config) as manager:
        at = manager.add_rule({"process": process, "tunnel": tunnel, "fallback": fallback}, index)
    _say(f"rule #{at} added: {process!r} → {tunnel} ({fallback})")


@rule_app.command("remove")
def rule_remove(index: Annotated[int, typer.Argument()], config: ConfigOption = None) -> None:
    """Remove the rule at INDEX (see `rule list`)."""
    with _user_errors(), _editing(config) as manager:
        removed = manager.remove_rule(index)
    _say(f"rule #{index} removed: {removed.process!r} → {removed.tunnel}")


# -- keys ---------------------------------------------------------------------------------------------------


@app.command()
def genkey() -> None:
    """Print a new private key (base64), like `wg genkey`."""
    from awg_split_tunnel.provider.wireguard.keys import generate_private_key

    typer.echo(generate_private_key())


@app.command("protect-secrets")
def protect_secrets(config: ConfigOption = None) -> None:
    """Windows: encrypt the keys and passwords written in the YAML with DPAPI (`dpapi:` values, readable
    on this machine only); comments are kept, `.conf` files are not changed."""
    from awg_split_tunnel.platform.data_folder import secret_protection

    protection = secret_protection()
    if protection is None:
        raise _fail("protect-secrets is Windows only (DPAPI); elsewhere the config is kept 0600")
    with _user_errors(), _editing(config) as manager:
        done = manager.protect_secrets(protection)
    if not done:
        _say("no plain secrets in ", str(manager.path), " (files of config_file are not changed)")
        return
    for key in done:
        _say("protected ", key)
    _say(f"{len(done)} secret(s) of {manager.path} are now DPAPI-encrypted for this machine")


@app.command()
def pubkey() -> None:
    """Read a private key on stdin and print its public key, like `wg pubkey`."""
    from awg_split_tunnel.provider.wireguard.keys import public_key

    text = sys.stdin.read().strip()
    try:
        typer.echo(public_key(text))
    except ValueError as exc:
        raise _fail(str(exc)) from None


@app.command()
def tun(
    file: Annotated[Path, typer.Argument(help="A WireGuard/AmneziaWG .conf file.")],
    ifname: Annotated[str, typer.Option("--ifname", help="Interface name to create.")] = "awg0",
) -> None:
    """Linux, root: run the tunnel of FILE.conf as a standalone userspace client on a TUN interface
    (addresses, MTU and routes for AllowedIPs set up, all removed on Ctrl-C / SIGTERM)."""
    if sys.platform != "linux":
        raise _fail("tun needs Linux (a TUN device); on Windows use the tunnel in `run`")
    from awg_split_tunnel.provider.wireguard.tun_client import run_tun_client

    raise typer.Exit(run_tun_client(file, ifname))


@app.command()
def run(
    config: ConfigOption = None,
    log_file: Annotated[
        Path | None, typer.Option("--log-file", help="Also log to this file (rotated at 10 MiB, 5 kept).")
    ] = None,
) -> None:
    """The daemon, in the foreground (root/Administrator). Ctrl-C or SIGTERM restores everything."""
    from awg_split_tunnel.daemon import run_daemon

    raise typer.Exit(run_daemon(_config_path(config), log_file=log_file))


@app.command()
def cleanup() -> None:
    """Remove what a daemon that died left: on Linux (root) its nftables table, first-packet gate and
    routes; on Windows (Administrator) its kill-switch filters. Until then — or until `run` starts again —
    `block` apps stay blocked (on Linux new connections wait too)."""
    if sys.platform not in ("linux", "win32"):
        raise _fail("cleanup is for the Linux kernel data path and the Windows kill switch")
    from awg_split_tunnel.api.control import default_control_path, request

    try:
        request("status", path=default_control_path(), timeout=1.0)
    except (AwgSplitTunnelError, OSError):
        pass
    else:
        raise _fail("a daemon is running: stop it (Ctrl-C or SIGTERM), it removes its rules itself")
    if sys.platform == "win32":
        from awg_split_tunnel.platform.windows.kill_switch import cleanup_kill_switch

        with _user_errors():
            count = cleanup_kill_switch()
        out.print(f"removed {count} kill-switch filters" if count else "nothing to remove")
        return
    import os

    if os.geteuid() != 0:
        raise _fail("cleanup needs root (it changes the firewall and routes): run it with sudo")
    from awg_split_tunnel.platform.linux.kernel_datapath import remove_kernel_state

    with _user_errors():
        removed = remove_kernel_state()
    if removed:
        for item in removed:
            _say(f"removed {item}")
    else:
        out.print("nothing to remove")


@app.command("systemd-unit")
def systemd_unit(config: ConfigOption = None) -> None:
    """Print a systemd unit that runs the daemon (restart on failure within a second); `service install`
    installs it."""
    from awg_split_tunnel.platform.linux.systemd import unit_text

    sys.stdout.write(unit_text(_config_path(config).resolve()))


def _service() -> SystemdService:
    """The systemd service of this installation (a seam: tests replace it with one on a fake systemctl)."""
    from awg_split_tunnel.platform.linux.systemd import SystemdService

    return SystemdService()


def _windows_service(action: str, config: Path | None = None) -> None:
    """Windows, Administrator: the service that runs the daemon (LocalSystem, starts at boot, restarted
    after a failure; its log is daemon.log beside the config): docs/WINDOWS.md."""
    from awg_split_tunnel.platform.windows.service import service_action

    with _user_errors():
        _say(service_action(action, _config_path(config)))


def _service_root_check(action: str) -> None:
    if sys.platform != "linux":
        raise _fail("service is for Linux with systemd, and Windows")
    import os

    if os.geteuid() != 0:
        raise _fail(f"service {action} needs root (it writes /etc/systemd/system): run it with sudo")


@service_app.command("install")
def service_install(config: ConfigOption = None) -> None:
    """Install the service, enable it at boot and start it now (with the default config, or -c): a
    systemd unit on Linux, a Windows service on Windows."""
    from awg_split_tunnel.platform.linux.systemd import unit_text

    if sys.platform == "win32":
        _windows_service("install", config)
        return
    _service_root_check("install")
    with _user_errors():
        manager = _manager(config)  # a unit that cannot start would only restart in a loop
        for line in _service().install(unit_text(manager.path.resolve())):
            _say(line)
    _say("status: ", ("awg-split-tunnel service status", "bold"), "; logs: journalctl -u awg-split-tunnel")


@service_app.command("uninstall")
def service_uninstall() -> None:
    """Stop and disable the service and remove it (the config stays)."""
    if sys.platform == "win32":
        _windows_service("uninstall")
        return
    _service_root_check("uninstall")
    with _user_errors():
        for line in _service().uninstall():
            _say(line)


@service_app.command("start")
def service_start() -> None:
    """Windows: start the installed service (Linux: systemctl start awg-split-tunnel)."""
    if sys.platform != "win32":
        raise _fail("on Linux: systemctl start awg-split-tunnel")
    _windows_service("start")


@service_app.command("stop")
def service_stop() -> None:
    """Windows: stop the service; it removes what it added, as Ctrl-C does (Linux: systemctl stop)."""
    if sys.platform != "win32":
        raise _fail("on Linux: systemctl stop awg-split-tunnel")
    _windows_service("stop")


@service_app.command("status")
def service_status() -> None:
    """Whether the unit is installed, enabled and running (Linux)."""
    if sys.platform != "linux":
        raise _fail("service status is for Linux with systemd; on Windows: sc query awg-split-tunnel")
    with _user_errors():
        for line in _service().status():
            _say(line)


@app.command()
def demo(
    ui: Annotated[
        bool, typer.Option("--ui", help="Keep it running with the apps live in the dashboard until Ctrl-C.")
    ] = False,
) -> None:
    """Linux, root: a self-contained lab in network namespaces showing the main job end to end."""
    from awg_split_tunnel.demo import run_demo

    raise typer.Exit(run_demo(out, ui=ui))


# -- the running daemon ----------------------------------------------------------------------------------


def _human_bytes(n: object) -> str:
    value = float(n) if isinstance(n, int | float) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "never"
    s = int(seconds)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Ask the running daemon: tunnels, state, rx/tx, handshake age, flows per tunnel."""
    from awg_split_tunnel.api.control import request

    with _user_errors():
        result = request("status")
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title="Tunnels", title_justify="left")
    for column in ("id", "type", "state", "since", "handshake", "rx", "tx", "flows", "reason"):
        table.add_column(column)
    colours = {"up": "green", "connecting": "yellow", "down": "red", "error": "red"}
    for t in result.get("tunnels", []):
        state = str(t.get("state", "?"))
        cells = _cells(
            t.get("id"),
            t.get("type"),
            state,
            _age(t.get("state_age")),
            _age(t.get("handshake_age")) if t.get("type") in ("amneziawg", "wireguard") else "-",
            _human_bytes(t.get("rx_bytes", 0)),
            _human_bytes(t.get("tx_bytes", 0)),
            t.get("flows", 0),
            t.get("reason") or "",
        )
        cells[2].stylize(colours.get(state, "white"))
        table.add_row(*cells)
    out.print(table)
    for t in result.get("tunnels", []):
        proxy = t.get("proxy") or {}
        refused = {k: v for k, v in proxy.items() if k in ("tcp_refused", "udp_refused")}
        if refused:
            # Flows over the proxy's caps (docs/ARCHITECTURE.md, "Proxy bounds").
            _say(
                f"{t.get('id')}: refused over the proxy's caps: "
                + ", ".join(f"{k} {v}" for k, v in refused.items())
            )
    _print_dns(result.get("tunnels", []))
    router = result.get("router") or {}
    if router:
        _say("router: " + ", ".join(f"{k} {v}" for k, v in sorted(router.items())))
    if result.get("failed_closed"):
        out.print(Text(f"failed closed: {result['failed_closed']}", style="bold red"))


def _print_dns(tunnels: list[dict[str, Any]]) -> None:
    """Each tunnel's DNS route and lookups (docs/DNS.md), when the daemon answers lookups per app."""
    rows = [t for t in tunnels if t.get("dns")]
    if not rows:
        return
    table = Table(title="DNS through the local resolver", title_justify="left")
    for column in ("id", "servers", "via", "answered", "cached", "refused", "failed"):
        table.add_column(column)
    for t in rows:
        dns = t["dns"]
        servers = ", ".join(dns.get("servers") or []) or "(none)"
        fields = ("answered", "cached", "refused", "failed")
        table.add_row(*_cells(t.get("id"), servers, dns.get("via"), *(dns.get(k, 0) for k in fields)))
    out.print(table)


@app.command()
def connections(as_json: JsonOption = False) -> None:
    """Live flows of the running daemon: pid, exe, 5-tuple, route, tunnel, traffic."""
    from awg_split_tunnel.api.control import request_pages

    # Page by page (the daemon answers 1000 flows at a time), written as they come: 200,000 flows are never
    # held in memory at once, and plain lines in fixed columns keep that fast (a table would first measure
    # every row). --json writes the one object {"flows": [...]} all the same.
    first = True
    write = sys.stdout.write
    with _user_errors():
        for page in request_pages("connections"):
            flows = page.get("flows", []) if isinstance(page, dict) else []
            if as_json:
                for f in flows:
                    write(('{"flows": [' if first else ", ") + json.dumps(f))
                    first = False
                continue
            if first:
                write(_connection_line(CONNECTION_COLUMNS))
                first = False
            for f in flows:
                write(
                    _connection_line(
                        (
                            f.get("proto"),
                            f.get("pid") or "?",
                            f.get("exe") or "?",
                            f.get("src"),
                            f.get("dst"),
                            f.get("route"),
                            f.get("tunnel") or "-",
                            f.get("out", ""),
                            f.get("in", ""),
                        )
                    )
                )
    if as_json:
        write('{"flows": []}\n' if first else "]}\n")
    sys.stdout.flush()


CONNECTION_COLUMNS = ("proto", "pid", "exe", "from", "to", "route", "tunnel", "out", "in")
_CONNECTION_WIDTHS = (5, 7, 30, 23, 23, 6, 10, 8, 8)


def _connection_line(values: tuple[object, ...]) -> str:
    """One row of `connections`, each cell left-aligned in its column (a longer value widens its row)."""
    cells = ["" if v is None else str(v) for v in values]
    return " ".join(c.ljust(w) for c, w in zip(cells, _CONNECTION_WIDTHS, strict=True)).rstrip() + "\n"


@app.command()
def ui(
    url_only: Annotated[bool, typer.Option("--url", help="Only print the address; open no browser.")] = False,
) -> None:
    """Open the running daemon's dashboard: prints its address (it carries this start's secret token,
    which signs the browser in) and opens a browser where there is one."""
    from awg_split_tunnel.api.control import request

    with _user_errors():
        url = str(request("ui")["url"])
    typer.echo(url)
    if url_only:
        return
    if not _has_browser_display():
        err.print("no graphical session here: open the address above in a browser on this machine")
        return
    if sys.platform != "win32":
        import os

        if os.geteuid() == 0:
            err.print("not starting a browser as root: open the address above in your browser")
            return
    import webbrowser

    if not webbrowser.open(url):
        err.print("no browser found: open the address above in a browser on this machine")


def _has_browser_display() -> bool:
    """A graphical browser can open: always on Windows and macOS, with an X or Wayland display elsewhere
    (without one, Python's webbrowser would start a text browser in this terminal)."""
    import os

    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


@tunnel_app.command("up")
def tunnel_up(tunnel_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Bring a tunnel up again (after `tunnel down`)."""
    from awg_split_tunnel.api.control import request

    with _user_errors():
        result = request("tunnel", action="up", id=tunnel_id)
    _say(f"{tunnel_id}: {result.get('state', 'up')}")


@tunnel_app.command("down")
def tunnel_down(tunnel_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Take a tunnel down by hand: its rules' fallback policies apply until `tunnel up`."""
    from awg_split_tunnel.api.control import request

    with _user_errors():
        result = request("tunnel", action="down", id=tunnel_id)
    _say(f"{tunnel_id}: {result.get('state', 'down')}")


def main() -> None:
    app()
