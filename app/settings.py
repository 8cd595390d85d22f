"""Streamhold's settings: one frozen dataclass, read from STREAMHOLD_* variables only when asked."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
MIN_SECRET = 16  # characters of STREAMHOLD_SECRET: share links are only as strong as it
# An origin a CSP `frame-ancestors` can name: scheme, host (optionally `*.` for its subdomains), port.
EMBED_ORIGIN = re.compile(
    r"^https?://(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$"
    r"|^https?://\[[0-9a-f:.]+\](:[0-9]{1,5})?$",
    re.IGNORECASE,
)


class SettingsError(ValueError):
    """A STREAMHOLD_* variable has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Everything the server and the in-process SDK need to know about their surroundings."""

    data_dir: Path = Path("data")
    database_url: str = ""
    channels_url: str = ""
    public_url: str = ""
    max_append_bytes: int = 5 * MIB
    long_poll_timeout: float = 20.0
    sse_keepalive: float = 15.0
    sweep_interval: float = 30.0
    send_timeout: float = 60.0
    header_timeout: float = 10.0
    idle_timeout: float = 5.0
    max_connections: int = 10_000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    llm_base_url: str = ""
    llm_api_key: str = field(default="", repr=False)
    llm_model: str = ""
    content_origin: str = ""
    cors_origins: tuple[str, ...] = ()
    webhook_allow_loopback: bool = False
    webhook_timeout: float = 10.0
    embed_origins: tuple[str, ...] = ()
    history_interval: float = 10.0
    # Free space kept for deletes and the WAL checkpoint: below it appends and creates are refused (507).
    # None: 64 MiB, or a twentieth of a smaller filesystem; 0: no reserve.
    min_free_bytes: int | None = None
    reads: str = "public"  # who may read a stream that chose no visibility: anyone, or keys and tokens
    secret: str = field(default="", repr=False)  # signs share links; the same on every process

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from STREAMHOLD_* variables (os.environ unless given)."""
        env = os.environ if environ is None else environ

        def text(name: str, default: str = "") -> str:
            return env.get(f"STREAMHOLD_{name}", default).strip()

        def number(name: str, default: float, minimum: float) -> float:
            raw = text(name)
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise SettingsError(f"STREAMHOLD_{name}={raw!r} is not a number") from None
            if value < minimum:
                raise SettingsError(f"STREAMHOLD_{name} must be at least {minimum}, got {raw}")
            return value

        def flag(name: str) -> bool:
            raw = text(name).lower()
            if raw in ("", "0", "false", "no", "off"):
                return False
            if raw in ("1", "true", "yes", "on"):
                return True
            raise SettingsError(f"STREAMHOLD_{name} must be true or false, got {raw!r}")

        keys = tuple(k.strip() for k in text("API_KEYS").split(",") if k.strip())
        content_origin = text("CONTENT_ORIGIN").rstrip("/")
        if content_origin and not content_origin.startswith(("http://", "https://")):
            raise SettingsError(
                f"STREAMHOLD_CONTENT_ORIGIN must be an origin such as https://content.example.org, "
                f"got {content_origin!r}"
            )
        public_url = text("PUBLIC_URL").rstrip("/")
        if content_origin and content_origin.split("://", 1)[1] == public_url.partition("://")[2]:
            raise SettingsError(
                "STREAMHOLD_CONTENT_ORIGIN must be another host than STREAMHOLD_PUBLIC_URL: it serves stream "
                "content only, so that content never shares the dashboard's origin"
            )
        reserve = text("MIN_FREE_BYTES")
        reads = text("READS", "public").lower()
        if reads not in ("public", "private"):
            raise SettingsError(f"STREAMHOLD_READS must be public or private, got {reads!r}")
        secret = text("SECRET")
        if secret and len(secret) < MIN_SECRET:
            raise SettingsError(
                f"STREAMHOLD_SECRET must be at least {MIN_SECRET} characters; generate one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if keys and reads == "private" and not secret:
            raise SettingsError(
                "STREAMHOLD_READS=private with API keys needs STREAMHOLD_SECRET, which signs the share links "
                "that open private streams without a key: set it to a long random string, the same on every "
                "process (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        cors = tuple(o.strip().rstrip("/") for o in text("CORS_ORIGINS").split(",") if o.strip())
        embed = embed_origins(text("EMBED_ORIGINS"))
        return cls(
            data_dir=Path(text("DATA_DIR", "data")),
            database_url=text("DATABASE_URL"),
            channels_url=text("CHANNELS_URL"),
            public_url=public_url,
            max_append_bytes=int(number("MAX_APPEND_BYTES", 5 * MIB, 1)),
            long_poll_timeout=number("LONG_POLL_TIMEOUT", 20.0, 0.05),
            sse_keepalive=number("SSE_KEEPALIVE", 15.0, 0.05),
            sweep_interval=number("SWEEP_INTERVAL", 30.0, 0.05),
            send_timeout=number("SEND_TIMEOUT", 60.0, 0.05),
            header_timeout=number("HEADER_TIMEOUT", 10.0, 0.05),
            idle_timeout=number("IDLE_TIMEOUT", 5.0, 0.05),
            max_connections=int(number("MAX_CONNECTIONS", 10_000, 1)),
            api_keys=keys,
            llm_base_url=text("LLM_BASE_URL").rstrip("/"),
            llm_api_key=text("LLM_API_KEY"),
            llm_model=text("LLM_MODEL"),
            content_origin=content_origin,
            cors_origins=cors,
            webhook_allow_loopback=flag("WEBHOOK_ALLOW_LOOPBACK"),
            webhook_timeout=number("WEBHOOK_TIMEOUT", 10.0, 0.05),
            embed_origins=embed,
            history_interval=number("HISTORY_INTERVAL", 10.0, 0.5),
            min_free_bytes=int(number("MIN_FREE_BYTES", 0, 0)) if reserve else None,
            reads=reads,
            secret=secret,
        )

    @property
    def sqlalchemy_url(self) -> str:
        """The SQLAlchemy URL of the store: SQLite under the data dir unless a database URL is set."""
        url = self.database_url
        if not url:
            return f"sqlite:///{self.data_dir / 'streamhold.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        if url.startswith(("postgresql+psycopg://", "sqlite:///")):
            return url
        raise SettingsError(
            "STREAMHOLD_DATABASE_URL must start with postgresql:// or sqlite:///, "
            f"got {url.split(':')[0]}:..."
        )

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    def origin(self) -> str:
        """The origin used in stream URLs."""
        return self.public_url or "http://127.0.0.1:8000"


def embed_origins(raw: str) -> tuple[str, ...]:
    """STREAMHOLD_EMBED_ORIGINS: the origins whose pages may frame the viewer's embed mode."""
    origins = []
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if not item.strip():
            continue
        if not EMBED_ORIGIN.match(origin):
            raise SettingsError(
                f"STREAMHOLD_EMBED_ORIGINS: {origin!r} is not an origin; list origins such as "
                "https://blog.example.org or https://*.example.org:8443 (scheme, host, optional port, "
                "no path), separated by commas"
            )
        origins.append(origin.lower())
    return tuple(origins)
