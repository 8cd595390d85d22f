"""urls.py: the URLs handed out, and the origin comparison that decides where a client's key may go."""

from __future__ import annotations

import pytest

from streamhold import urls


def test_handed_out_urls() -> None:
    origin = "http://127.0.0.1:8000"
    assert urls.stream_url(origin, "stream_0a") == "http://127.0.0.1:8000/stream/stream_0a"
    assert urls.viewer_url(origin, "chat/answer 1") == "http://127.0.0.1:8000/watch/chat/answer%201"
    assert urls.viewer_url("", "x") == "/watch/x"
    assert urls.protocol_base(origin) == "http://127.0.0.1:8000/v1/stream/"
    assert urls.protocol_url(origin, "a/b?c") == "http://127.0.0.1:8000/v1/stream/a/b%3Fc"
    assert urls.dashboard_url(origin) == "http://127.0.0.1:8000/"
    assert urls.demo_url(origin) == "http://127.0.0.1:8000/demo"


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://127.0.0.1:8000"),
        ("::1", "http://[::1]:8000"),
        ("streams.example.org", "http://streams.example.org:8000"),
    ],
)
def test_the_origin_a_listening_server_is_reached_at(host: str, origin: str) -> None:
    assert urls.listen_origin(host, 8000) == origin


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("http://127.0.0.1:8000/stream/x", "http://127.0.0.1:8000", True),
        ("https://Streams.Example.org/", "https://streams.example.org:443", True),
        ("http://example.org", "http://example.org:80", True),
        ("http://127.0.0.1:8001", "http://127.0.0.1:8000", False),
        ("https://example.org", "http://example.org", False),
        ("http://example.org.evil.test", "http://example.org", False),
        ("http://127.0.0.1:notaport", "http://127.0.0.1:8000", False),
        ("not a url", "http://127.0.0.1:8000", False),
    ],
)
def test_same_origin_decides_where_a_key_may_go(a: str, b: str, same: bool) -> None:
    assert urls.same_origin(a, b) is same


def test_a_stream_url_is_split_into_its_origin_and_id() -> None:
    assert urls.split_stream_url("http://h:8000/stream/stream_1?x=1#top") == ("http://h:8000", "stream_1")
    assert urls.split_stream_url("http://h:8000/stream/") is None
    assert urls.split_stream_url("http://h:8000/stream/a/b") is None
    assert urls.split_stream_url("http://h:8000/watch/a") is None
    assert urls.split_stream_url("http://h:port/stream/a") is None
