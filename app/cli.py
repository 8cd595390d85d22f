"""`streamhold`: `serve` (the default command) and client commands."""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from types import FrameType

import click
import uvicorn

from app.settings import Settings, SettingsError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """Tells live responses to end as soon as a stop is asked for, so shutdown takes a moment, not minutes."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.loaded_app
        while app is not None and not hasattr(app, "state"):
            app = getattr(app, "app", None)
        hub = getattr(getattr(app, "state", None), "hub", None) if app is not None else None
        if hub is not None:
            hub.shutdown()
        super().handle_exit(sig, frame)


@click.group(invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Streamhold: durable, append-only streams over HTTP."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--insecure", is_flag=True, help="Listen beyond loopback without API keys (anyone can write).")
@click.option("--log-level", default="warning", show_default=True)
def serve(host: str = "127.0.0.1", port: int = 8000, insecure: bool = False, log_level: str = "warning") -> None:
    """Serve the HTTP API, the viewer and the dashboard."""
    try:
        settings = Settings.from_env()
        settings.sqlalchemy_url  # noqa: B018 - validates the URL before anything starts
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    if not settings.api_keys and not _is_loopback(host) and not insecure:
        raise click.ClickException(
            f"refusing to listen on {host} without API keys: set STREAMHOLD_API_KEYS=<key>[,<key>...] "
            "(clients send Authorization: Bearer <key>), or pass --insecure to allow anyone to write"
        )
    if not settings.public_url:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        settings = dataclasses.replace(settings, public_url=f"http://{shown}:{port}")
    from app.main import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=2,
        lifespan="on",
        access_log=False,
        proxy_headers=False,
    )
    server = _Server(config)
    try:
        server.run()  # on uvloop when it is installed
    except KeyboardInterrupt:
        pass
    if server.started is False and not server.should_exit:
        sys.exit(1)



if __name__ == "__main__":
    main()
