"""`streamhold subscriptions ls | rm | rotate-key`: a running server's subscriptions, for operators.

Each talks to --server with --key like the other client commands; listing and key rotation are admin calls
(an API key when the server has keys; from the server's own machine when it has none).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import click

from .checks import shown
from .client_cli import client_options, run
from .sdk.remote import RemoteStreams
from .web.humanize import relative


def _seconds(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None


def _targets(item: dict[str, Any]) -> str:
    parts = [item["pattern"]] if item.get("pattern") else []
    parts += item.get("streams") or []
    return ", ".join(parts)


def _last(item: dict[str, Any], now: float) -> str:
    when = relative(_seconds(item.get("last_delivery_at")), now)
    if item.get("last_ok") is False:
        when += " (failed)"
    return when


@click.group("subscriptions")
def subscriptions() -> None:
    """A server's subscriptions: list them, delete one, rotate the webhook signing key."""


@subscriptions.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@client_options
def ls(as_json: bool, server: str, key: str | None) -> None:
    """List subscriptions: what they watch, their state, last delivery and failures."""

    async def fetch() -> list[dict[str, Any]]:
        async with RemoteStreams(server, key) as streams:
            return await streams.list_subscriptions()

    found = run(fetch(), key)
    if as_json:
        for item in found:
            click.echo(json.dumps(item))
        return
    if not found:
        click.echo("no subscriptions", err=True)
        return
    now = time.time()
    rows = [("ID", "WATCHES", "TYPE", "STATUS", "LAST DELIVERY", "FAILURES")]
    for item in found:
        failures = str(item.get("failures", 0))
        if item.get("last_error") and item.get("last_ok") is False:
            failures += f" ({item['last_error']})"
        rows.append(
            (
                shown(item["id"]),
                shown(_targets(item)),
                shown(item["type"]),
                shown(item["status"]),
                _last(item, now),
                shown(failures),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@subscriptions.command("rm")
@click.argument("subscription_ids", nargs=-1, required=True)
@client_options
def rm(subscription_ids: tuple[str, ...], server: str, key: str | None) -> None:
    """Delete subscriptions (their streams are untouched)."""

    async def remove() -> list[str]:
        missing = []
        async with RemoteStreams(server, key) as streams:
            for sid in subscription_ids:
                if await streams.get_subscription(sid) is None:
                    missing.append(sid)
                    continue
                await streams.delete_subscription(sid)
                click.echo(f"deleted {shown(sid)}")
        return missing

    missing = run(remove(), key)
    if missing:
        raise click.ClickException(
            "no subscription "
            + ", ".join(repr(shown(m)) for m in missing)
            + ": see `streamhold subscriptions ls`"
        )


@subscriptions.command("rotate-key")
@click.option("--retire", is_flag=True, help="Stop publishing the previous keys now instead of after 24 h.")
@client_options
def rotate_key(retire: bool, server: str, key: str | None) -> None:
    """Sign webhooks with a new key; the previous one stays in the JWKS for 24 h (or until --retire)."""

    async def act() -> dict[str, Any]:
        async with RemoteStreams(server, key) as streams:
            return await streams.rotate_signing_key(retire=retire)

    answer = run(act(), key)
    if retire:
        click.echo(f"retired {len(answer['retired'])} key(s); signing with {answer['kid']}")
    else:
        click.echo(f"signing with {answer['kid']}; published: {', '.join(answer['published'])}")
