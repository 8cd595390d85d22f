"""`streamhold token create|ls|revoke`: scoped tokens, minted and revoked at a server with an API key."""

from __future__ import annotations

import json
import re
from typing import Any

import click
import httpx

from .checks import shown
from .client_cli import client_options

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
TIMEOUT = 30.0


def ttl_seconds(text: str | None) -> float:
    """--ttl: seconds, or a number with s, m, h or d; `never`, 0 or nothing for a token that never expires."""
    if text is None or text.strip().lower() in ("never", "0", ""):
        return 0
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise click.ClickException(f"--ttl takes seconds or a duration (30m, 12h, 7d) or never; got {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def _call(server: str, key: str | None, method: str, path: str, body: Any = None) -> Any:
    """One request to the server's /tokens; any failure becomes one line that says what to do."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=server.rstrip("/"), timeout=TIMEOUT, headers=headers) as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise click.ClickException(
            f"cannot reach the server at {server} ({exc or type(exc).__name__}); start it with "
            "`streamhold serve` or point --server / STREAMHOLD_URL at it"
        ) from None
    try:
        payload = response.json() if response.content else None
    except ValueError:
        payload = None
    if response.is_error:
        message = payload.get("error") or payload.get("detail") if isinstance(payload, dict) else None
        message = message or f"the server answered {response.status_code}"
        if response.status_code == 401:
            message += "; pass an API key with --key or STREAMHOLD_API_KEY"
        raise click.ClickException(shown(str(message)))
    return payload


@click.group()
def token() -> None:
    """Scoped tokens: what a holder may do (read, write, manage) in which namespaces, until when."""


@token.command("create")
@click.option("--scope", "scopes", required=True, help="Comma-separated: read, write, manage.")
@click.option(
    "--namespace", "namespaces", multiple=True, required=True,
    help="A namespace, or a prefix such as exports/* (repeat, or separate with commas).",
)
@click.option("--ttl", default=None, help="Lifetime: seconds, or 30m, 12h, 7d; never by default.")
@click.option("--label", default="", help="A note saying who or what holds the token.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@client_options
def create(
    scopes: str, namespaces: tuple[str, ...], ttl: str | None, label: str, as_json: bool, server: str,
    key: str | None,
) -> None:
    """Mint a token; its secret is printed this once and never kept by the server."""
    body = {
        "scopes": [s.strip() for s in scopes.split(",") if s.strip()],
        "namespaces": [n.strip() for item in namespaces for n in item.split(",") if n.strip()],
        "ttl": ttl_seconds(ttl),
        "label": label,
    }
    made = _call(server, key, "POST", "/tokens", body)
    if as_json:
        click.echo(json.dumps(made))
        return
    click.echo(made["token"])
    click.echo(
        f"id {made['id']}  scopes {','.join(made['scopes'])}  namespaces {','.join(made['namespaces'])}  "
        f"expires {made['expires_at'] or 'never'}",
        err=True,
    )
    click.echo("the token is shown this once: keep it now", err=True)


@token.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the tokens as JSON.")
@client_options
def list_tokens(as_json: bool, server: str, key: str | None) -> None:
    """The tokens not revoked (never their secrets)."""
    tokens = _call(server, key, "GET", "/tokens")["tokens"]
    if as_json:
        click.echo(json.dumps(tokens))
        return
    click.echo(f"{'ID':<18}{'SCOPES':<20}{'NAMESPACES':<28}{'EXPIRES':<28}LABEL")
    for item in tokens:
        click.echo(
            f"{item['id']:<18}{','.join(item['scopes']):<20}{shown(','.join(item['namespaces'])):<28}"
            f"{item['expires_at'] or 'never':<28}{shown(item['label'])}"
        )


@token.command("revoke")
@click.argument("token_ids", nargs=-1, required=True)
@client_options
def revoke(token_ids: tuple[str, ...], server: str, key: str | None) -> None:
    """Revoke tokens by id: every server process refuses them within a second."""
    for token_id in token_ids:
        _call(server, key, "DELETE", f"/tokens/{token_id}")
        click.echo(f"revoked {token_id}")
