"""The fault harness's workload: seeded random writers, readers, deletes, forks and kill -9 against servers.

Appends to a stream name, and its creates and deletes, take a per-name lock (shared for appends, exclusive
for a create or delete), so every append belongs to a known incarnation; readers take no lock, so they race
everything, which is what the checker is for.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from tests._fault_history import Append, History, record_bytes
from tests._fault_readers import Readers
from tests._fault_wire import OCTETS, PREFIX, Slot, Transport, Wire, offset_position
from tests._server import ServerProcess, ServerStartError

BIG = 64 * 1024


@dataclass
class Plan:
    """How long and how hard to run."""

    seconds: float
    workers: int = 6
    kills: bool = True
    kill_every: tuple[float, float] = (1.0, 2.5)
    big_weight: float = 6.0
    big_max: int = 160 * 1024
    disk_full: bool = False
    sliding_ttl: int = 2
    fixed_ttl: float = 2.5
    retry_for: float = 30.0  # seconds past the deadline that creates, deletes and producer retries go on


class Workload:
    """Drives `servers` for `plan.seconds` with a seeded mix of operations, recording into `history`."""

    def __init__(self, servers: Sequence[ServerProcess], plan: Plan, history: History) -> None:
        self.servers = list(servers)
        self.plan = plan
        self.history = history
        self.rng = random.Random(history.seed)
        tag = f"fz{history.seed % 100000}"
        self.slots = [
            Slot("n0", "named"),
            Slot("n1", "named"),
            Slot("s0", "named", ttl="sliding"),
            Slot("x0", "named", ttl="fixed"),
            Slot("i0", "id"),
            Slot("i1", "id"),
            Slot("f0", "fork"),
        ]
        for slot in self.slots:
            slot.path = f"{tag}-{slot.key}"
        self.deadline = 0.0
        self.latest = 0.0
        self.wire = Wire(servers, history, allowed_5xx=plan.disk_full)
        self.readers = Readers(self.wire, plan.sliding_ttl)
        self.allowed_5xx = plan.disk_full

    def server_error(self, status: int) -> bool:
        """A 5xx is a bug, except 507 from a server whose disk is full (it says nothing was stored)."""
        return status >= 500 and not (self.allowed_5xx and status == 507)

    # --- the run -------------------------------------------------------------------------------

    async def run(self) -> None:
        self.deadline = time.monotonic() + self.plan.seconds
        self.latest = self.deadline + self.plan.seconds
        self.history.note(f"start: {len(self.servers)} server(s), {self.plan}")
        try:
            for slot in self.slots:
                if slot.kind != "fork":
                    await self.create(random.Random(self.rng.random()), slot)
            tasks = [self.worker(n, random.Random(self.rng.random())) for n in range(self.plan.workers)]
            if self.plan.kills:
                tasks.append(self.chaos(random.Random(self.rng.random())))
            await asyncio.gather(*tasks)
            await self.restore_servers()
            await self.final_reads(random.Random(self.rng.random()))
        finally:
            await self.wire.client.aclose()

    async def chaos(self, rng: random.Random) -> None:
        low, high = self.plan.kill_every
        while True:
            pause = rng.uniform(low, high)
            if time.monotonic() + pause >= self.deadline - 0.5:
                return
            await asyncio.sleep(pause)
            victim = rng.choice(self.servers)
            if not victim.running:
                continue
            self.history.kills += 1
            self.history.note(f"kill -9 server pid {victim.pid} ({victim.url})")
            down = time.monotonic()
            await asyncio.to_thread(victim.kill)
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            await self.revive(victim)
            # Time spent restarting does not count, up to twice the planned run: the run stays bounded.
            self.deadline = min(self.deadline + time.monotonic() - down, self.latest)

    async def revive(self, server: ServerProcess) -> None:
        """Start a killed server again; a busy machine may need more than one try."""
        for attempt in range(3):
            try:
                await asyncio.to_thread(server.start)
            except ServerStartError as exc:
                self.history.note(f"server {server.url} did not come back (try {attempt + 1}): {exc}")
                continue
            self.history.note(f"server {server.url} up again as pid {server.pid}")
            return
        self.history.server_errors.append(f"server {server.url} did not start again after kill -9")

    async def restore_servers(self) -> None:
        for server in self.servers:
            if not server.running:
                await self.revive(server)

    async def worker(self, number: int, rng: random.Random) -> None:
        ops = [
            (self.append_op, 30.0),
            (self.big_append_op, self.plan.big_weight),
            (self.producer_op, 12.0),
            (self.readers.catch_up_op, 12.0),
            (self.readers.long_poll_op, 5.0),
            (self.readers.sse_op, 5.0),
            (self.readers.content_op, 6.0),
            (self.readers.resume_op, 4.0),
            (self.close_op, 2.5),
            (self.delete_op, 2.5),
            (self.fork_op, 1.5),
        ]
        functions, weights = zip(*ops, strict=True)
        while time.monotonic() < self.deadline:
            op = rng.choices(functions, weights)[0]
            slot = rng.choice(self.slots)
            try:
                await op(rng, slot, number)
            except Transport as exc:
                self.history.note(f"w{number} {op.__name__} {slot.key}: transport {exc}")
                await asyncio.sleep(0.05)

    # --- structure -----------------------------------------------------------------------------

    async def create(self, rng: random.Random, slot: Slot) -> None:
        """Give `slot` a live incarnation (under its exclusive lock)."""
        async with slot.lock.exclusive():
            if slot.alive:
                return
            slot.busy += 1
            try:
                if slot.kind == "fork":
                    source = rng.choice([s for s in self.slots if s.kind == "named" and not s.ttl])
                    # The source stays one incarnation until the fork is made, even over retries.
                    async with source.lock.shared():
                        if source.alive:
                            await self._create(rng, slot, source)
                else:
                    await self._create(rng, slot)
            finally:
                slot.busy -= 1
                slot.version += 1

    async def _create(self, rng: random.Random, slot: Slot, source: Slot | None = None) -> None:
        history = self.history
        doubt = False  # an earlier try may have created the stream before its answer was lost
        while time.monotonic() < self.deadline + self.plan.retry_for:
            sent = time.monotonic()
            try:
                if slot.kind == "id":
                    response = await self.wire.request(
                        rng,
                        "POST",
                        "/stream",
                        json={"name": "fz", "headers": {"content-type": OCTETS}, "ttl": 0},
                    )
                else:
                    headers = {"content-type": OCTETS}
                    if slot.ttl == "sliding":
                        headers["stream-ttl"] = str(self.plan.sliding_ttl)
                    elif slot.ttl == "fixed":
                        moment = datetime.fromtimestamp(time.time() + self.plan.fixed_ttl, UTC)
                        headers["stream-expires-at"] = moment.isoformat().replace("+00:00", "Z")
                    if source is not None:
                        headers["stream-forked-from"] = PREFIX + source.path
                        response = await self.wire.request(rng, "PUT", PREFIX + slot.path, headers=headers)
                    else:
                        response = await self.put(rng, slot, headers)
            except Transport as exc:
                doubt = doubt or exc.sent
                history.note(f"create {slot.key}: transport {exc}; again")
                await asyncio.sleep(0.2)
                continue
            if response.status_code >= 500:
                history.note(f"create {slot.key}: {response.status_code} {response.text[:200]}")
                if self.server_error(response.status_code):
                    history.server_errors.append(
                        f"create {slot.key}: {response.status_code} {response.text[:200]}"
                    )
                await asyncio.sleep(0.2)
                continue
            if response.status_code not in (200, 201):
                history.note(f"create {slot.key}: {response.status_code} {response.text[:200]}")
                return
            previous = history.incarnations.get((slot.key, slot.inc))
            ended = previous is not None and previous.ended == "deleted"
            new = response.status_code == 201 or slot.kind == "id" or slot.inc == 0 or ended
            if not new and doubt:
                # A 200 after a lost try: our own earlier try made it if it is shorter than the last one was.
                tail = offset_position(response.headers.get("stream-next-offset")) or 0
                new = tail < self.acked_end(slot)
            if new:
                slot.inc += 1
                slot.closed = False
                slot.producers.clear()
            slot.alive = True
            if new and slot.ttl == "sliding":
                slot.expires = sent + self.plan.sliding_ttl
            elif new and slot.ttl == "fixed":
                slot.expires = sent + self.plan.fixed_ttl - 0.5
            if slot.kind == "id":
                stream_id = response.json()["id"]
                slot.path = stream_id
                slot.ids[slot.inc] = stream_id
            history.incarnation(slot.key, slot.inc, stream_id=slot.path, ttl=slot.ttl or None)
            if source is not None and new:
                # Nothing has been appended to a new fork yet: its tail is where it forked.
                point = offset_position(response.headers.get("stream-next-offset")) or 0
                history.incarnation(slot.key, slot.inc, fork_of=(source.key, source.inc, point))
            history.note(
                f"create {slot.key} -> {response.status_code}, incarnation {slot.inc} ({slot.path})"
                f"{f' forked from {source.key}#{source.inc}' if source else ''}"
            )
            return

    def acked_end(self, slot: Slot) -> int:
        """How far the slot's current incarnation surely reaches: the end of its last acknowledged append."""
        ends = [
            a.end for a in self.history.appends.values() if (a.key, a.inc) == (slot.key, slot.inc) and a.end
        ]
        return max(ends, default=0)

    async def put(self, rng: random.Random, slot: Slot, headers: dict[str, str]) -> httpx.Response:
        """A protocol create; half the time sent twice at once, as two clients creating one name would."""
        if rng.random() < 0.5:
            return await self.wire.request(rng, "PUT", PREFIX + slot.path, headers=headers)
        both = await asyncio.gather(
            self.wire.request(rng, "PUT", PREFIX + slot.path, headers=headers),
            self.wire.request(rng, "PUT", PREFIX + slot.path, headers=headers),
            return_exceptions=True,
        )
        answers = [r for r in both if isinstance(r, httpx.Response)]
        codes = [r.status_code for r in answers]
        self.history.note(
            f"create {slot.key} twice at once -> {codes} {[str(r) for r in both if r not in answers]}"
        )
        for answer in answers:
            if self.server_error(answer.status_code):
                self.history.server_errors.append(
                    f"create {slot.key} sent twice at once: {answer.status_code} {answer.text[:200]}"
                )
        if codes.count(201) > 1:
            self.history.server_errors.append(f"create {slot.key} sent twice at once: both answered 201")
        for wanted in (201, 200):
            for answer in answers:
                if answer.status_code == wanted:
                    return answer
        if answers:
            return answers[0]
        failure = both[0]
        assert isinstance(failure, BaseException)
        raise failure

    async def delete_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        async with slot.lock.exclusive():
            if not slot.alive:
                pass
            else:
                slot.busy += 1
                try:
                    await self._delete(rng, slot)
                finally:
                    slot.busy -= 1
                    slot.version += 1
        if rng.random() < 0.7:
            await self.create(rng, slot)

    async def _delete(self, rng: random.Random, slot: Slot) -> None:
        history = self.history
        inc = history.incarnation(slot.key, slot.inc)
        # Nothing can append now: read the incarnation whole, so reads that raced it can be checked.
        try:
            content, note = await self.readers.read_whole(rng, slot)
        except Transport as exc:
            content, note = None, f"transport {exc}"
        if content is not None:
            inc.final, inc.final_note = content, "read before delete"
        doubt = False  # a delete may have reached a server that died before answering
        while time.monotonic() < self.deadline + self.plan.retry_for:
            try:
                path = f"/stream/{slot.path}" if slot.kind == "id" else PREFIX + slot.path
                response = await self.racing(rng, slot, self.wire.request(rng, "DELETE", path))
            except Transport as exc:
                doubt = doubt or exc.sent
                history.note(f"delete {slot.key}#{slot.inc}: transport {exc}; again")
                await asyncio.sleep(0.2)
                continue
            if response.status_code in (200, 204, 404):
                slot.alive = False
                gone = "deleted"
                if response.status_code == 404 and not doubt:
                    gone = "expired" if slot.ttl else "vanished"
                inc.ended = gone
                if gone == "vanished":
                    history.server_errors.append(
                        f"delete {inc.label}: 404 for a stream nothing deleted ({note})"
                    )
                history.note(f"delete {inc.label} -> {response.status_code} ({note})")
                return
            history.note(f"delete {inc.label} -> {response.status_code} {response.text[:200]}")
            if self.server_error(response.status_code):
                history.server_errors.append(f"delete: {response.status_code} {response.text[:200]}")
            await asyncio.sleep(0.2)
        if doubt:
            slot.alive = False  # deleted or not: the next create will tell (201 or 200)
            inc.ended = "maybe deleted"

    async def racing(
        self, rng: random.Random, slot: Slot, action: Coroutine[Any, Any, httpx.Response]
    ) -> httpx.Response:
        """`action`, half the time with a read of the same stream sent at the same moment."""
        if rng.random() < 0.5:
            return await action
        readers = self.readers
        read = rng.choice([readers.catch_up_op, readers.long_poll_op, readers.sse_op, readers.content_op])
        done, raced = await asyncio.gather(
            action, read(random.Random(rng.random()), slot, -1), return_exceptions=True
        )
        if isinstance(raced, Transport):
            self.history.note(f"read racing a close or delete of {slot.key}: transport {raced}")
        elif isinstance(raced, BaseException):
            raise raced
        if isinstance(done, BaseException):
            raise done
        return done

    async def fork_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        fork = next(s for s in self.slots if s.kind == "fork")
        if fork.alive:
            await self.delete_op(rng, fork, number)
        else:
            await self.create(rng, fork)

    async def close_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        async with slot.lock.shared():
            if not slot.alive:
                return
            gzip = slot.kind == "id" and rng.random() < 0.6
            inc = slot.inc
            sent = time.monotonic()
            if slot.kind == "id":
                headers = {"x-compress": "gzip"} if gzip else {}
                closing = self.wire.request(rng, "POST", f"/stream/{slot.path}/complete", headers=headers)
            else:
                headers = {"stream-closed": "true"}
                closing = self.wire.request(rng, "POST", PREFIX + slot.path, headers=headers)
            response = await self.racing(rng, slot, closing)
            self.history.note(f"close {slot.key}#{inc} gzip={gzip} -> {response.status_code}")
            if response.status_code in (200, 204):
                slot.closed = True
            elif self.server_error(response.status_code):
                self.history.server_errors.append(f"close: {response.status_code} {response.text[:200]}")
            elif response.status_code == 404:
                self.refused_as_gone(slot, sent, f"close {slot.key}#{inc}")

    def refused_as_gone(self, slot: Slot, sent: float, what: str) -> None:
        """A write answered 404: wrong unless the stream's TTL may have run out by the time it was sent."""
        # On a full disk a read's slide of a sliding TTL may fail unseen: expiry is then unknown.
        judged = not (slot.ttl == "sliding" and self.allowed_5xx)
        if judged and (not slot.ttl or sent < slot.expires - 0.3):
            self.history.server_errors.append(
                f"{what}: 404 for a stream that exists "
                f"(ttl={slot.ttl or 'none'}, {slot.expires - sent:.2f} s of life left)"
            )
        slot.alive = False
        self.history.incarnation(slot.key, slot.inc, ended="expired" if slot.ttl else "vanished")

    # --- appends -------------------------------------------------------------------------------

    async def append_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        await self.append(rng, slot, number, rng.randint(30, 400), producer=False)

    async def big_append_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        await self.append(rng, slot, number, rng.randint(BIG, self.plan.big_max), producer=False)

    async def producer_op(self, rng: random.Random, slot: Slot, number: int) -> None:
        size = rng.randint(BIG, self.plan.big_max) if rng.random() < 0.15 else rng.randint(30, 300)
        await self.append(rng, slot, number, size, producer=True)

    async def append(self, rng: random.Random, slot: Slot, number: int, size: int, producer: bool) -> None:
        if not slot.alive:
            await self.create(rng, slot)
            return
        async with slot.lock.shared():
            if not slot.alive:
                return
            uid = self.history.next_uid()
            record = Append(uid, slot.key, slot.inc, record_bytes(uid, size), time.monotonic())
            self.history.appends[uid] = record
            headers = {"content-type": OCTETS}
            if producer:
                state = slot.producers.setdefault(number, [f"p{number}-{slot.inc}-{uid}", 0])
                pid, seq = str(state[0]), int(state[1])  # type: ignore[call-overload]
                headers.update({"producer-id": pid, "producer-epoch": "0", "producer-seq": str(seq)})
                record.producer = (pid, 0, seq)
            attempts = 200 if producer else 1
            # The /stream API's append answers 204 with no offset: the bytes must be there once, somewhere.
            path = PREFIX + slot.path
            if slot.kind == "id" and not producer and rng.random() < 0.3:
                path = f"/stream/{slot.path}/append"
            for attempt in range(attempts):
                sent = time.monotonic()
                try:
                    response = await self.wire.request(
                        rng, "POST", path, content=record.data, headers=headers
                    )
                except Transport as exc:
                    record.statuses.append(str(exc))
                    if not exc.sent and record.outcome == "pending":
                        record.outcome = "fail"
                    elif exc.sent:
                        record.outcome = "maybe"
                    if attempt + 1 < attempts and time.monotonic() < self.deadline + self.plan.retry_for:
                        await asyncio.sleep(0.15)
                        continue
                    break
                self._settle(slot, record, response, producer, sent)
                # Only a server error is worth another try; a refusal (closed, gone) is final.
                if response.status_code < 500 or attempt + 1 >= attempts:
                    break
                await asyncio.sleep(0.15)
            record.t1 = time.monotonic()
            if producer:
                if record.outcome in ("ack", "ack-dup"):
                    slot.producers[number][1] = seq + 1
                elif record.outcome == "maybe":
                    slot.producers.pop(number, None)  # its next seq is unknown: start a new producer
            self.history.note(
                f"w{number} append {slot.key}#{record.inc} uid={uid:x} {size}B"
                f"{' producer ' + str(record.producer) if producer else ''} -> {record.outcome}"
                f" {record.statuses} [{record.start},{record.end})"
            )

    def _settle(
        self, slot: Slot, record: Append, response: httpx.Response, producer: bool, sent: float
    ) -> None:
        status = response.status_code
        record.statuses.append(str(status))
        end = offset_position(response.headers.get("stream-next-offset"))
        if status == 204 and end is None and not producer:
            record.outcome = "ack-somewhere"
            return
        if status in (200, 204) and end is not None:
            if producer and status == 204:
                record.outcome = "ack-dup" if record.outcome == "maybe" else "ack-dup?"
                if record.outcome == "ack-dup?":
                    self.history.server_errors.append(
                        f"append uid={record.uid:x}: a first producer attempt answered 204 (duplicate)"
                    )
                    record.outcome = "ack-dup"
            else:
                record.outcome = "ack"
                record.end, record.start = end, end - len(record.data)
            return
        if status == 507 and self.allowed_5xx and record.outcome != "maybe":
            record.outcome = "fail"  # a full disk: nothing was stored, which the check holds it to
            return
        if status >= 500:
            record.outcome = "maybe"
            if self.server_error(status):
                self.history.server_errors.append(
                    f"append {slot.key}#{record.inc} uid={record.uid:x}: {status} {response.text[:200]}"
                )
            return
        if record.outcome == "maybe" and producer:
            # A retry refused for good: the first attempt's fate stays unknown.
            return
        record.outcome = "fail"
        if status == 404:
            self.refused_as_gone(slot, sent, f"append {slot.key}#{record.inc} uid={record.uid:x}")
        elif status == 409 and slot.closed:
            pass
        elif status == 409:
            slot.closed = True  # closed by a close whose answer was lost, or a real conflict
            self.history.note(f"append {slot.key}: 409 {response.text[:200]}")
        else:
            self.history.server_errors.append(
                f"append {slot.key}#{record.inc} uid={record.uid:x}: {status} {response.text[:200]}"
            )

    async def final_reads(self, rng: random.Random) -> None:
        """With nothing else running, read every live incarnation whole (its reference content)."""
        for slot in self.slots:
            if slot.inc == 0:
                continue
            inc = self.history.incarnation(slot.key, slot.inc)
            if not slot.alive:
                continue
            content, note = None, ""
            for _ in range(5):
                try:
                    content, note = await self.readers.read_whole(rng, slot)
                    break
                except Transport as exc:
                    note = str(exc)
                    await asyncio.sleep(0.3)
            if content is not None:
                inc.final, inc.final_note = content, "read at the end"
            elif "404" in note:
                inc.ended = "expired" if slot.ttl else "vanished"
                if not slot.ttl:
                    self.history.server_errors.append(f"{inc.label}: 404 at the end, though never deleted")
            self.history.note(f"final read {inc.label}: {note}")
