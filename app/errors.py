"""The StreamError tree: what a stream operation can refuse with, and the HTTP status each maps to."""

from __future__ import annotations


class StreamError(Exception):
    """Base of the errors a stream operation can raise; `status` is the HTTP status it maps to."""

    status = 400


class StreamNotFoundError(StreamError):
    status = 404


class StreamGoneError(StreamError):
    """The stream was deleted while forks of it still exist."""

    status = 410


class OffsetGoneError(StreamError):
    """The offset was handed out by an earlier stream of this name, which has been deleted."""

    status = 410


class StreamClosedError(StreamError):
    status = 409

    def __init__(self, message: str, tail: int = 0, generation: int = 0) -> None:
        super().__init__(message)
        self.tail = tail
        self.generation = generation


class StreamConflictError(StreamError):
    status = 409


class SharingUnavailableError(StreamConflictError):
    """The server has no STREAMHOLD_SECRET to sign share links with."""


class ContentTypeMismatchError(StreamConflictError):
    pass


class SeqConflictError(StreamConflictError):
    pass


class ProducerSeqGapError(StreamConflictError):
    def __init__(self, expected: int, received: int) -> None:
        super().__init__(f"producer sequence gap: expected {expected}, received {received}")
        self.expected = expected
        self.received = received


class StaleEpochError(StreamError):
    status = 403

    def __init__(self, current: int) -> None:
        super().__init__(f"producer epoch is stale; the current epoch is {current}")
        self.current = current


class PayloadTooLargeError(StreamError):
    status = 413


class InvalidRequestError(StreamError):
    status = 400


class StorageFullError(StreamError):
    """The server's storage is full: the write was not stored. Free space or delete streams, then retry."""

    status = 507

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message
            or "the server's storage is full and nothing was stored; free space on its disk or delete "
            "streams, then retry"
        )
