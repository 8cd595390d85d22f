"""`streamhold share ID --ttl 1h [--stop]`: an expiring link that reads one stream, made at its server."""

from __future__ import annotations

import json

import click

from .client_cli import _target, client_options, run
from .sdk.base import ShareLink
from .sdk.remote import RemoteStreams
from .token_cli import ttl_seconds


@click.command()
@click.argument("target", metavar="ID|URL")
@click.option("--ttl", default="1h", show_default=True, help="How long the link works: 3600, 30m, 12h, 7d.")
@click.option("--stop", is_flag=True, help="The link may also ask the stream's writer to stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@client_options
def share(target: str, ttl: str, stop: bool, as_json: bool, server: str, key: str | None) -> None:
    """Print a share link to the stream's viewer, then one to its content; the server signs them with
    STREAMHOLD_SECRET, and making them needs an API key or a token with manage on the stream's namespace."""
    seconds = ttl_seconds(ttl)
    if seconds <= 0:
        raise click.ClickException(f"--ttl takes seconds or a duration (30m, 12h, 7d); got {ttl!r}")
    server, stream_id, key = _target(target, server, key)

    async def make() -> ShareLink:
        async with RemoteStreams(server, key) as streams:
            return await streams.share(stream_id, ttl=seconds, stop=stop)

    made = run(make(), key)
    if as_json:
        expires = made.expires_at.isoformat().replace("+00:00", "Z")
        fields = {"url": made.url, "content_url": made.content_url, "expires_at": expires, "stop": made.stop}
        click.echo(json.dumps(fields))
        return
    click.echo(made.url)
    click.echo(made.content_url)
    stops = "  (may ask the writer to stop)" if made.stop else ""
    click.echo(f"expires {made.expires_at.isoformat()}{stops}", err=True)
