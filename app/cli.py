"""`streamhold`: every command, in one list; `serve` is the default.

A command lives in the module of its concept (serving here and in serve.py, talking to a running server in
client_cli.py, the demo in demo_cli.py) and joins `streamhold` by its place in COMMANDS below.
"""

from __future__ import annotations

import dataclasses
import sys

import click

from . import backup_cli, client_cli, share_cli, subscription_cli, token_cli, urls
from .settings import Settings, SettingsError


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--insecure", is_flag=True, help="Listen beyond loopback without API keys (anyone can write).")
@click.option("--log-level", default="warning", show_default=True)
def serve(
    host: str = "127.0.0.1", port: int = 8000, insecure: bool = False, log_level: str = "warning"
) -> None:
    """Serve the HTTP API, the viewer and the dashboard."""
    from .serve import is_loopback, run  # uvicorn and the server load for this command only

    try:
        settings = Settings.from_env()
        settings.sqlalchemy_url  # noqa: B018 - validates the URL before anything starts
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    if not settings.api_keys and not is_loopback(host) and not insecure:
        raise click.ClickException(
            f"refusing to listen on {host} without API keys: set STREAMHOLD_API_KEYS=<key>[,<key>...] "
            "(clients send Authorization: Bearer <key>), or pass --insecure to allow anyone to write"
        )
    if not settings.public_url:
        settings = dataclasses.replace(settings, public_url=urls.listen_origin(host, port))
    if not run(settings, host, port, log_level, lambda text: click.echo(text, err=True)):
        sys.exit(1)


@click.command()
@click.option("--url", envvar="STREAMHOLD_URL", default="", help="A running server [default: :8000 if up].")
@click.option("--in-process", is_flag=True, help="Serve the demo from this process, whatever else runs.")
@click.option("--port", default=0, type=int, help="Port of the in-process server [default: 8000 or any].")
@click.option("--linger", default=600.0, show_default=True, help="Seconds the in-process server stays up.")
def demo(url: str = "", in_process: bool = False, port: int = 0, linger: float = 600.0) -> None:
    """Stream a simulated (or configured real) LLM answer into the live viewer and print its URL."""
    from .demo_cli import cli_demo

    try:
        cli_demo(url, port, linger, in_process, click.echo)
    except (RuntimeError, OSError, SettingsError) as exc:
        raise click.ClickException(str(exc)) from None


# Every command of `streamhold`. To add one, write it as a click command in the module of its concept (a
# command that talks to a running server: client_cli.py, with @client_options and run()) and list it here.
COMMANDS: tuple[click.Command, ...] = (
    serve,
    demo,
    client_cli.write,
    client_cli.cat,
    client_cli.list_command,
    client_cli.info,
    client_cli.rm,
    subscription_cli.subscriptions,
    backup_cli.backup,
    backup_cli.restore,
    backup_cli.check,
    token_cli.token,
    share_cli.share,
)


@click.group(invoke_without_command=True, commands=COMMANDS)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Streamhold: durable, append-only streams over HTTP."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


if __name__ == "__main__":
    main()
