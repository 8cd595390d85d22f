"""The fault harness's readers: catch-up, long-poll, SSE and /stream/{id} reads, recorded for the checker.

Readers take no lock: they race appends, closes, gzip, deletes and kills on purpose. A reader that goes on
from an offset it was given earlier (maybe after its stream was deleted and created again) is a new session
that holds the incarnation of the one it came from.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time

import httpx

from tests._fault_history import Read
from tests._fault_wire import PREFIX, Slot, Wire, offset_position
from tests._sse import sse_events


class Readers:
    """The read operations of the workload, and the offsets they keep to resume from."""

    def __init__(self, wire: Wire, sliding_ttl: float) -> None:
        self.wire = wire
        self.history = wire.history
        self.sliding_ttl = sliding_ttl
        self.session = 0
        self.parents: dict[int, int] = {}
        self.bookmarks: list[tuple[Slot, str, int | None, int, str]] = []

    def new_session(self) -> int:
        self.session += 1
        return self.session

    async def catch_up_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        path, fixed = self.wire.target(slot)
        await self.follow(rng, slot, path, fixed, self.new_session(), "-1", None, rng.randint(1, 4))

    async def long_poll_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        path, fixed = self.wire.target(slot)
        await self.follow(rng, slot, path, fixed, self.new_session(), "-1", "long-poll", rng.randint(1, 3))

    async def resume_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        """Go on from an offset read earlier, maybe after its stream was deleted and created again."""
        if not self.bookmarks:
            return
        held, path, fixed, parent, token = self.bookmarks.pop(rng.randrange(len(self.bookmarks)))
        session = self.new_session()
        self.parents[session] = parent
        await self.follow(rng, held, path, fixed, session, token, None, rng.randint(1, 3))

    async def follow(
        self,
        rng: random.Random,
        slot: Slot,
        path: str,
        fixed: int | None,
        session: int,
        token: str,
        live: str | None,
        steps: int,
    ) -> None:
        """Read from `token`, following Stream-Next-Offset for up to `steps` requests, as one session."""
        for _ in range(steps):
            before = self.wire.mark(slot)
            params = {"offset": token}
            if live:
                params["live"] = live
            t0 = time.monotonic()
            response = await self.wire.request(rng, "GET", path, params=params)
            incs, stable = self.wire.candidates(slot, before, fixed)
            read = Read(
                live or "catch-up",
                slot.key,
                incs,
                t0,
                time.monotonic(),
                response.status_code,
                start=offset_position(token) if token != "-1" else 0,
                session=session,
                parent=self.parents.get(session, 0),
                gone=self.wire.gone(slot, before, fixed),
                stable=stable,
            )
            read.data = response.content if response.status_code == 200 else b""
            read.claimed = offset_position(response.headers.get("stream-next-offset"))
            read.closed_claim = response.headers.get("stream-closed") == "true"
            read.note = f"{path}?{params}"
            self.history.reads.append(read)
            if response.status_code == 200 and slot.ttl == "sliding":
                slot.expires = max(slot.expires, t0 + 0.9 * self.sliding_ttl)
            if response.status_code >= 500 and not self.wire.allowed_5xx:
                self.history.server_errors.append(
                    f"read {path}: {response.status_code} {response.text[:200]}"
                )
            if response.status_code not in (200, 204) or read.claimed is None:
                return
            token = response.headers["stream-next-offset"]
            if rng.random() < 0.3 and len(self.bookmarks) < 50:
                self.bookmarks.append((slot, path, fixed, session, token))
            if read.closed_claim or (live is None and response.headers.get("stream-up-to-date") == "true"):
                return

    async def sse_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        session = self.new_session()
        path, fixed = self.wire.target(slot)
        before = self.wire.mark(slot)
        t0 = time.monotonic()
        position = 0
        server = self.wire.server(rng)
        try:
            async with asyncio.timeout(rng.uniform(0.3, 1.5)):
                async with self.wire.client.stream(
                    "GET", server.url + path, params={"offset": "-1", "live": "sse"}
                ) as response:
                    if response.status_code != 200:
                        incs, stable = self.wire.candidates(slot, before, fixed)
                        self.history.reads.append(
                            Read(
                                "sse",
                                slot.key,
                                incs,
                                t0,
                                time.monotonic(),
                                response.status_code,
                                session=session,
                                gone=self.wire.gone(slot, before, fixed),
                                stable=stable,
                            )
                        )
                        return
                    binary = response.headers.get("stream-sse-data-encoding") == "base64"
                    async for kind, payload, event_id in sse_events(response.aiter_lines()):
                        incs, _ = self.wire.candidates(slot, before, fixed)
                        if kind == "data":
                            data = base64.b64decode(payload) if binary else payload.encode()
                            read = Read(
                                "sse",
                                slot.key,
                                incs,
                                t0,
                                time.monotonic(),
                                200,
                                start=position,
                                data=data,
                                claimed=offset_position(event_id),
                                session=session,
                                gone=self.wire.gone(slot, before, fixed),
                            )
                            self.history.reads.append(read)
                            position += len(data)
                        elif kind == "control":
                            control = json.loads(payload)
                            read = Read(
                                "sse-control",
                                slot.key,
                                incs,
                                t0,
                                time.monotonic(),
                                200,
                                start=position,
                                claimed=offset_position(control.get("streamNextOffset")),
                                session=session,
                                gone=self.wire.gone(slot, before, fixed),
                                closed_claim=bool(control.get("streamClosed")),
                            )
                            self.history.reads.append(read)
                            if control.get("streamClosed"):
                                return
        except TimeoutError:
            pass
        except httpx.ConnectError:
            pass
        except httpx.TransportError as exc:
            self.history.note(f"sse {slot.key}: {type(exc).__name__} at {position}")

    async def content_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        """GET /stream/{id}: a byte Range of a closed stream, the whole content, or a bounded tail."""
        if slot.kind != "id" or slot.inc == 0:
            return
        inc = slot.inc
        stream_id = slot.ids.get(inc, slot.path)
        path = f"/stream/{stream_id}"
        before = self.wire.mark(slot)
        choice = rng.random()
        t0 = time.monotonic()
        session = self.new_session()
        if slot.closed and choice < 0.4:
            first = rng.randint(0, 4000)
            last = first + rng.randint(0, 200_000)
            headers = {"range": f"bytes={first}-{last}", "accept-encoding": "identity"}
            response = await self.wire.request(rng, "GET", path, headers=headers)
            read = Read(
                "range",
                slot.key,
                (inc,),
                t0,
                time.monotonic(),
                response.status_code,
                session=session,
                gone=self.wire.gone(slot, before, inc),
            )
            if response.status_code == 206:
                span, _, total = (
                    response.headers.get("content-range", "").removeprefix("bytes ").partition("/")
                )
                lo, _, hi = span.partition("-")
                read.start, read.data = int(lo), response.content
                read.claimed = int(hi) + 1
                read.closed_claim = read.claimed == int(total)
            elif response.status_code == 200:
                read.start, read.data, read.claimed = 0, response.content, len(response.content)
                read.closed_claim = response.headers.get("stream-closed") == "true"
            read.stable = self.wire.candidates(slot, before, inc)[1]
            read.note = f"{path} {headers}"
            self.history.reads.append(read)
            return
        follow = "false" if choice < 0.75 else "true"
        start = rng.choice([0, 0, rng.randint(0, 3000)])
        params = {"follow": follow, "offset": str(start)}
        if choice < 0.3 or (slot.closed and choice < 0.75):
            # No offset: a closed stream is then served as stored, gzipped when it was closed with gzip.
            start, params = 0, {"follow": follow}
        headers = {"accept-encoding": "gzip"}
        read = Read(
            "content",
            slot.key,
            (inc,),
            t0,
            0.0,
            None,
            start=start,
            session=session,
            note=f"{path} {params}",
            gone=self.wire.gone(slot, before, inc),
        )
        body = bytearray()
        try:
            async with asyncio.timeout(rng.uniform(0.3, 1.5)):
                async with self.wire.client.stream(
                    "GET", self.wire.server(rng).url + path, params=params, headers=headers
                ) as response:
                    read.status = response.status_code
                    try:
                        async for piece in response.aiter_bytes():
                            body += piece
                    except httpx.TransportError:
                        read.data, read.note = bytes(body), read.note + " cut"
                        return
                    read.data = bytes(body)
                    if response.status_code == 200:
                        # A body that ended cleanly says: this is everything, up to the tail or the close.
                        length = response.headers.get("content-length")
                        gz = response.headers.get("content-encoding") == "gzip"
                        if length is not None and not gz:
                            read.claimed = start + int(length)
                        else:
                            read.claimed = start + len(body)
                        read.closed_claim = (
                            follow == "true" or response.headers.get("stream-closed") == "true"
                        )
                    else:
                        read.data = b""
        except TimeoutError:
            read.note += " timed out"
            read.data, read.claimed = bytes(body) if read.status == 200 else b"", None
        except httpx.TransportError as exc:
            read.note += f" {type(exc).__name__}"
            read.data, read.claimed = bytes(body) if read.status == 200 else b"", None
        finally:
            read.t1 = time.monotonic()
            read.stable = self.wire.candidates(slot, before, inc)[1]
            if read.status is not None:
                self.history.reads.append(read)

    async def read_whole(self, rng: random.Random, slot: Slot) -> tuple[bytes | None, str]:
        """The whole content of the slot's stream through catch-up reads; None and why if it cannot."""
        content = bytearray()
        token = "-1"
        session = self.new_session()
        for _ in range(1000):
            t0 = time.monotonic()
            response = await self.wire.request(rng, "GET", PREFIX + slot.path, params={"offset": token})
            read = Read("whole", slot.key, (slot.inc,), t0, time.monotonic(), response.status_code)
            read.start, read.session, read.note = len(content), session, f"{slot.path}?offset={token}"
            if response.status_code == 200:
                read.data = response.content
                read.claimed = offset_position(response.headers.get("stream-next-offset"))
            self.history.reads.append(read)
            if response.status_code != 200:
                return None, f"catch-up answered {response.status_code} at {len(content)}"
            next_token = response.headers.get("stream-next-offset")
            end = offset_position(next_token)
            if end is None or end != len(content) + len(response.content):
                return None, f"catch-up at {len(content)} gave {len(response.content)} B claiming {end}"
            content += response.content
            token = str(next_token)
            if response.headers.get("stream-up-to-date") == "true":
                return bytes(content), f"{len(content)} B"
        return None, "no end after 1000 reads"
