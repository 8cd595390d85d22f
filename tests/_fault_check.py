"""The fault harness's checker: the trust rules, verified over a whole recorded history.

Each incarnation's reference content is what was read whole while nothing could append to it (before its
delete, or at the end); without one, only its acknowledged appends are known.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tests._fault_history import Append, History, Incarnation, parse_header


@dataclass(frozen=True)
class Violation:
    """One broken rule, named for the report, and what broke it."""

    rule: str
    text: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.text}"


class Known:
    """What is known of one incarnation's bytes: all of them, or the acknowledged appends only."""

    def __init__(self, inc: Incarnation, acked: list[Append]) -> None:
        self.inc = inc
        self.final = inc.final
        self.pieces = sorted((a.start, a.data) for a in acked if a.start is not None)

    def compare(self, start: int, data: bytes) -> str:
        """Whether `data` is what sits at `start`: "match", "mismatch" or "unknown"."""
        if not data:
            return "match"
        if self.final is not None:
            return "match" if self.final[start : start + len(data)] == data else "mismatch"
        end, seen = start + len(data), 0
        for piece_start, piece in self.pieces:
            lo, hi = max(start, piece_start), min(end, piece_start + len(piece))
            if lo < hi:
                if data[lo - start : hi - start] != piece[lo - piece_start : hi - piece_start]:
                    return "mismatch"
                seen += hi - lo
        return "match" if seen == len(data) else "unknown"


def check(history: History) -> list[Violation]:
    """Every violation of the trust rules in `history`."""
    found = [Violation("server", text) for text in history.server_errors]
    by_inc: dict[tuple[str, int], list[Append]] = defaultdict(list)
    for append in history.appends.values():
        by_inc[(append.key, append.inc)].append(append)
    known: dict[tuple[str, int], Known] = {}
    for ident, inc in sorted(history.incarnations.items()):
        appends = by_inc.get(ident, [])
        acked = [a for a in appends if a.outcome == "ack"]
        known[ident] = Known(inc, acked)
        found += _acks_in_order(inc, acked)
        if inc.final is not None:
            found += _content(history, inc, appends)
    for inc in history.incarnations.values():
        found += _fork_prefix(inc, known)
    found += _reads(history, known)
    return found


def _acks_in_order(inc: Incarnation, acked: list[Append]) -> list[Violation]:
    """An append acknowledged before another was sent sits before it; no two acknowledged appends overlap."""
    out: list[Violation] = []
    spans = sorted((a.start, a.end, a.uid) for a in acked if a.start is not None and a.end is not None)
    for (s1, e1, u1), (s2, e2, u2) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            out.append(
                Violation(
                    "ack-overlap", f"{inc.label}: appends {u1:x} [{s1},{e1}) and {u2:x} [{s2},{e2}) overlap"
                )
            )
    answered = sorted((a.t1, a.end or 0, a.uid) for a in acked)
    latest: tuple[int, int] | None = None
    position = 0
    for append in sorted(acked, key=lambda a: a.t0):
        while position < len(answered) and answered[position][0] < append.t0:
            _, end, uid = answered[position]
            if latest is None or end > latest[0]:
                latest = (end, uid)
            position += 1
        if latest is not None and append.start is not None and append.start < latest[0]:
            out.append(
                Violation(
                    "offset-backwards",
                    f"{inc.label}: append {append.uid:x} sent after {latest[1]:x} was acknowledged up to "
                    f"{latest[0]}, yet acknowledged at [{append.start},{append.end})",
                )
            )
    return out


def _content(history: History, inc: Incarnation, appends: list[Append]) -> list[Violation]:
    """The reference content parses into whole appends of this incarnation, each once, acks where acked."""
    out: list[Violation] = []
    content = inc.final
    assert content is not None
    position = inc.fork_of[2] if inc.fork_of else 0
    if len(content) < position:
        return [Violation("fork", f"{inc.label}: {len(content)} B, shorter than its fork point {position}")]
    seen: set[int] = set()
    while position < len(content):
        header = parse_header(content, position)
        if header is None:
            out.append(
                Violation(
                    "hole",
                    f"{inc.label}: bytes at {position} of {len(content)} are not the start of an append "
                    f"(a hole, a torn write or foreign bytes): {content[position : position + 40]!r}",
                )
            )
            break
        uid, length = header
        append = history.appends.get(uid)
        where = f"{inc.label} at [{position},{position + length})"
        if append is None:
            out.append(Violation("foreign", f"{where}: append {uid:x} was never sent"))
            break
        if content[position : position + length] != append.data:
            out.append(
                Violation("torn", f"{where}: append {uid:x} is not whole ({len(content) - position} B left)")
            )
            break
        if (append.key, append.inc) != (inc.key, inc.number):
            out.append(
                Violation("misplaced", f"{where}: append {uid:x} was sent to {append.key}#{append.inc}")
            )
        if uid in seen:
            out.append(
                Violation("duplicate", f"{where}: append {uid:x} appears twice (producer {append.producer})")
            )
        if append.outcome == "fail":
            out.append(
                Violation(
                    "refused-committed",
                    f"{where}: append {uid:x} was refused ({append.statuses}) yet is there",
                )
            )
        if append.outcome == "ack" and append.start != position:
            out.append(
                Violation(
                    "ack-offset", f"{where}: append {uid:x} was acknowledged at [{append.start},{append.end})"
                )
            )
        seen.add(uid)
        position += length
    for append in appends:
        if append.outcome in ("ack", "ack-dup", "ack-somewhere") and append.uid not in seen:
            out.append(
                Violation(
                    "lost",
                    f"{inc.label}: acknowledged append {append.uid:x} [{append.start},{append.end}) "
                    f"({append.statuses}) is not in the {len(content)} B read {inc.final_note}",
                )
            )
    return out


def _fork_prefix(inc: Incarnation, known: dict[tuple[str, int], Known]) -> list[Violation]:
    if inc.fork_of is None or inc.final is None:
        return []
    source_key, source_inc, point = inc.fork_of
    source = known.get((source_key, source_inc))
    if source is None:
        return []
    if source.compare(0, inc.final[:point]) == "mismatch":
        return [
            Violation("fork", f"{inc.label}: its first {point} B differ from {source_key}#{source_inc}'s")
        ]
    return []


def _reads(history: History, known: dict[tuple[str, int], Known]) -> list[Violation]:
    out: list[Violation] = []
    sessions: dict[int, set[int] | None] = {}
    last_claim: dict[int, int] = {}
    for read in history.reads:
        label = f"{read.kind} {read.key} {read.note} (status {read.status}, incarnations {read.incs})"
        if read.status == 404 and read.stable:
            out.append(Violation("read-404", f"{label}: 404 while the stream surely existed"))
        if read.status not in (200, 204, 206) or read.start is None:
            continue
        delivered = read.start + len(read.data)
        if read.claimed is not None:
            if read.claimed > delivered:
                out.append(
                    Violation(
                        "overclaim",
                        f"{label}: claims offset {read.claimed} but delivered {len(read.data)} B from "
                        f"{read.start} (up to {delivered})",
                    )
                )
            elif read.claimed < delivered:
                out.append(
                    Violation("underclaim", f"{label}: delivered up to {delivered}, claims {read.claimed}")
                )
            previous = last_claim.get(read.session)
            if previous is not None and read.claimed < previous:
                out.append(
                    Violation("offset-backwards", f"{label}: next offset {read.claimed} after {previous}")
                )
            last_claim[read.session] = max(previous or 0, read.claimed)
        verdicts = {}
        for number in read.incs:
            ref = known.get((read.key, number))
            verdicts[number] = "unknown" if ref is None else ref.compare(read.start, read.data)
        fits = {n for n, v in verdicts.items() if v != "mismatch"}
        if not fits:
            out.append(
                Violation(
                    "wrong-bytes",
                    f"{label}: {len(read.data)} B at {read.start} are not the content of any incarnation "
                    f"it could have read ({verdicts}); first bytes {read.data[:40]!r}",
                )
            )
            continue
        ended = known.get((read.key, read.gone))
        if read.data and fits == {read.gone} and ended is not None and ended.inc.ended == "deleted":
            out.append(
                Violation(
                    "served-deleted", f"{label}: {len(read.data)} B of {ended.inc.label}, deleted before"
                )
            )
        if read.closed_claim and read.claimed is not None:
            ordered = sorted(fits)
            finals = [known[(read.key, n)].final if (read.key, n) in known else None for n in ordered]
            lengths = {n: len(final) for n, final in zip(ordered, finals, strict=True) if final is not None}
            # Only when every incarnation it may have read is known whole: one not known could be that long.
            if None not in finals and all(length != read.claimed for length in lengths.values()):
                out.append(
                    Violation(
                        "closed-short",
                        f"{label}: says the stream is closed at {read.claimed}, but it holds {lengths} B",
                    )
                )
        if read.data:
            held = sessions.get(read.session)
            if held is None and read.parent:
                held = sessions.get(read.parent)
            if held is None:
                sessions[read.session] = fits
            elif not held & fits:
                out.append(
                    Violation(
                        "incarnation-mix",
                        f"{label}: one reader's offsets crossed incarnations:"
                        f" earlier reads fit {sorted(held)}, this one fits {sorted(fits)} only",
                    )
                )
            else:
                sessions[read.session] = held & fits
    return out


def report(history: History, violations: list[Violation], limit: int = 25) -> str:
    """A failure message: the seed to replay, the violations, and the history's last events."""
    lines = [
        f"{len(violations)} violation(s); replay with STREAMHOLD_FAULT_SEED={history.seed}",
        *(f"  {v}" for v in violations[:limit]),
    ]
    if len(violations) > limit:
        lines.append(f"  ... and {len(violations) - limit} more")
    lines += ["last events:", history.tail()]
    return "\n".join(lines)
