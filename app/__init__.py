"""Streamhold: a self-hosted durable streams server, and the Python API to its streams.

Names load on first use: `from streamhold import RemoteStreams` imports neither the server nor SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checks import InvalidInputError
    from .errors import (
        ContentTypeMismatchError,
        InvalidRequestError,
        OffsetGoneError,
        PayloadTooLargeError,
        ProducerSeqGapError,
        SeqConflictError,
        SharingUnavailableError,
        StaleEpochError,
        StorageFullError,
        StreamClosedError,
        StreamConflictError,
        StreamError,
        StreamGoneError,
        StreamNotFoundError,
    )
    from .main import create_app
    from .sdk.base import ShareLink, StreamService
    from .sdk.context import AgentContext, create_agent_context
    from .sdk.remote import RemoteStreamError, RemoteStreams, ServerUnavailableError, UnauthorizedError
    from .sdk.webhooks import SubscriptionRequestError, WebhookVerificationError, verify_webhook
    from .settings import Settings, SettingsError

_WHERE = {
    "create_app": "main",
    "create_agent_context": "sdk.context",
    "AgentContext": "sdk.context",
    "StreamService": "sdk.base",
    "ShareLink": "sdk.base",
    "RemoteStreams": "sdk.remote",
    "Settings": "settings",
    "SettingsError": "settings",
    "StreamError": "errors",
    "StreamNotFoundError": "errors",
    "StreamGoneError": "errors",
    "OffsetGoneError": "errors",
    "StreamClosedError": "errors",
    "StreamConflictError": "errors",
    "ContentTypeMismatchError": "errors",
    "SeqConflictError": "errors",
    "ProducerSeqGapError": "errors",
    "StaleEpochError": "errors",
    "SharingUnavailableError": "errors",
    "StorageFullError": "errors",
    "PayloadTooLargeError": "errors",
    "InvalidRequestError": "errors",
    "InvalidInputError": "checks",
    "RemoteStreamError": "sdk.remote",
    "ServerUnavailableError": "sdk.remote",
    "UnauthorizedError": "sdk.remote",
    "verify_webhook": "sdk.webhooks",
    "WebhookVerificationError": "sdk.webhooks",
    "SubscriptionRequestError": "sdk.webhooks",
}

__all__ = [
    "AgentContext",
    "ContentTypeMismatchError",
    "InvalidInputError",
    "InvalidRequestError",
    "OffsetGoneError",
    "PayloadTooLargeError",
    "ProducerSeqGapError",
    "RemoteStreamError",
    "RemoteStreams",
    "SeqConflictError",
    "ServerUnavailableError",
    "Settings",
    "SettingsError",
    "ShareLink",
    "SharingUnavailableError",
    "StaleEpochError",
    "StorageFullError",
    "StreamClosedError",
    "StreamConflictError",
    "StreamError",
    "StreamGoneError",
    "StreamNotFoundError",
    "StreamService",
    "SubscriptionRequestError",
    "UnauthorizedError",
    "WebhookVerificationError",
    "verify_webhook",
    "create_agent_context",
    "create_app",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first access (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'streamhold' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
