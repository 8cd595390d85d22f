"""The tables of subscriptions: their configuration and wake state, their stream cursors, the signing key."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, LargeBinary, Text
from sqlmodel import Field, SQLModel

from ..models import MAX_NAME_LENGTH
from .schema import table_of

MAX_SUBSCRIPTION_ID = 255


class SubscriptionRow(SQLModel, table=True):
    """One subscription, with the wake in flight (if any) and its webhook delivery's state."""

    __tablename__ = "subscriptions"

    id: str = Field(primary_key=True, max_length=MAX_SUBSCRIPTION_ID)
    kind: str = Field(max_length=16)  # "webhook" or "pull-wake"
    config_json: str = Field(sa_column=Column(Text, nullable=False))
    config_hash: str = Field(max_length=64)
    origin: str = Field(max_length=2048)  # the origin its callback URL is given with
    created_at: float
    generation: int = Field(default=0, sa_type=BigInteger)
    wake_id: str | None = Field(default=None, max_length=32)
    snapshot_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    trigger: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    holder: str | None = Field(default=None, max_length=255)
    lease_until: float | None = Field(default=None, index=True)
    status: str = Field(default="active", max_length=16)
    # The webhook delivery of the wake in flight: due at next_attempt_at, held by one process at a time
    # (deliverer) until deliver_until, after which another process may take it over.
    deliver_due: bool = Field(default=False, index=True)
    attempts: int = 0
    next_attempt_at: float | None = None
    deliverer: str | None = Field(default=None, max_length=64)
    deliver_until: float | None = None


class SubscriptionLinkRow(SQLModel, table=True):
    """One stream's cursor in one subscription: how it is linked, and the last offset acknowledged."""

    __tablename__ = "subscription_links"

    subscription_id: str = Field(primary_key=True, max_length=MAX_SUBSCRIPTION_ID)
    path: str = Field(primary_key=True, max_length=MAX_NAME_LENGTH)
    glob: bool = False
    explicit: bool = False
    acked_offset: str = Field(max_length=40)


class SubscriptionActivityRow(SQLModel, table=True):
    """What one subscription last did, for people to see: its last delivery (or claim) and its failures."""

    __tablename__ = "subscription_activity"

    subscription_id: str = Field(primary_key=True, max_length=MAX_SUBSCRIPTION_ID)
    last_delivery_at: float | None = None
    last_ok: bool | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    failures: int = 0  # failed webhook deliveries, all time


class SigningKeyRow(SQLModel, table=True):
    """The server's Ed25519 key pairs (raw private bytes): the newest signs; a retired one is no longer
    published once `retire_at` has passed."""

    __tablename__ = "signing_keys"

    kid: str = Field(primary_key=True, max_length=64)
    private_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: float


subscriptions = table_of(SubscriptionRow)
links = table_of(SubscriptionLinkRow)
signing_keys = table_of(SigningKeyRow)
activity = table_of(SubscriptionActivityRow)
SUBSCRIPTION_TABLES = (subscriptions, links, signing_keys, activity)
