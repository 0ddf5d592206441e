"""The `awg-split-tunnel` command line."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="awg-split-tunnel",
    help="Multi-tunnel VPN client with per-process split tunnelling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Multi-tunnel VPN client with per-process split tunnelling."""


@app.command()
def version() -> None:
    """Print the version."""
    from awg_split_tunnel import __version__

    typer.echo(__version__)


def main() -> None:
    app()
