"""A recording reverse proxy on loopback: forwards every request to one server, streaming the answer (SSE
included), and keeps the method and target of each, so a test can see what a browser really sent."""

from __future__ import annotations

import http.client
import http.server
import threading
from urllib.parse import urlsplit

from tests._server import HOST, free_port

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class RecordingProxy:
    """`with RecordingProxy(upstream) as proxy:` then point the browser at `proxy.url`; `proxy.seen` lists
    (method, path with query) in arrival order."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.seen: list[tuple[str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def forward(self) -> None:
                proxy.seen.append((self.command, self.path))
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    self.send_response_only(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("connection", "close")  # the body ends when the connection does
                    self.end_headers()
                    self.close_connection = True
                    if self.command == "HEAD":
                        return
                    while chunk := answer.read1(65536):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except OSError:  # the browser or the server hung up: nothing more to pass on
                    self.close_connection = True
                finally:
                    upstream.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = forward

        self.httpd = http.server.ThreadingHTTPServer((HOST, free_port()), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.httpd.server_address[1]}"

    def __enter__(self) -> RecordingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
