"""The fault harness's checker finds each kind of violation in a small hand-made history."""

from __future__ import annotations

from tests._fault_check import check
from tests._fault_history import Append, History, Read, record_bytes


def history_of(sizes: list[int], number: int = 1, key: str = "n0") -> tuple[History, list[Append]]:
    """A history with one incarnation whose appends were acknowledged back to back, and its content."""
    history = History(7 + number)
    appends, position, clock = [], 0, 0.0
    for size in sizes:
        uid = history.next_uid()
        data = record_bytes(uid, size)
        append = Append(uid, key, number, data, t0=clock, t1=clock + 0.01, outcome="ack")
        append.start, append.end = position, position + size
        history.appends[uid] = append
        appends.append(append)
        position += size
        clock += 0.02
    history.incarnation(key, number, final=b"".join(a.data for a in appends), final_note="at the end")
    return history, appends


def rules(history: History) -> list[str]:
    return [v.rule for v in check(history)]


def read(start: int, data: bytes, claimed: int, session: int = 1, incs: tuple[int, ...] = (1,)) -> Read:
    return Read(
        "catch-up", "n0", incs, 1.0, 1.1, 200, start=start, data=data, claimed=claimed, session=session
    )


def test_a_clean_history_passes() -> None:
    history, appends = history_of([30, 100, 70_000])
    content = history.incarnations[("n0", 1)].final
    assert content is not None
    history.reads += [read(0, content[:130], 130), read(130, content[130:], len(content))]
    assert rules(history) == []


def test_a_read_that_claims_more_than_it_delivered() -> None:
    history, _ = history_of([30, 100])
    history.reads.append(read(0, b"", 130))
    assert rules(history) == ["overclaim"]


def test_an_acknowledged_append_missing_from_the_content() -> None:
    history, appends = history_of([30, 100, 40])
    inc = history.incarnations[("n0", 1)]
    inc.final = appends[0].data + appends[1].data
    assert rules(history) == ["lost"]


def test_a_duplicate_after_a_retry() -> None:
    history, appends = history_of([30, 100])
    inc = history.incarnations[("n0", 1)]
    assert inc.final is not None
    inc.final += appends[1].data
    assert "duplicate" in rules(history)


def test_bytes_after_a_hole() -> None:
    history, appends = history_of([30, 100])
    inc = history.incarnations[("n0", 1)]
    inc.final = appends[0].data + b"\0" * 10 + appends[1].data
    assert rules(history)[0] == "hole"


def test_a_refused_append_that_was_committed() -> None:
    history, appends = history_of([30, 100])
    appends[1].outcome, appends[1].start, appends[1].end = "fail", None, None
    assert rules(history) == ["refused-committed"]


def test_an_acknowledgement_that_went_backwards() -> None:
    history, appends = history_of([30, 100])
    first, second = appends
    first.t0, first.t1, second.t0, second.t1 = 5.0, 5.1, 1.0, 1.1
    assert rules(history) == ["offset-backwards"]


def test_a_reader_carried_into_a_new_incarnation() -> None:
    history, _ = history_of([30, 100], number=1)
    again, _ = history_of([40, 90], number=2)
    history.appends.update(again.appends)
    history.incarnations.update(again.incarnations)
    old = history.incarnations[("n0", 1)].final
    new = history.incarnations[("n0", 2)].final
    assert old is not None and new is not None
    history.reads += [read(0, old[:30], 30, incs=(1,)), read(30, new[30:130], 130, incs=(2,))]
    assert rules(history) == ["incarnation-mix"]


def test_bytes_that_no_incarnation_held() -> None:
    history, _ = history_of([30, 100])
    history.reads.append(read(0, b"x" * 30, 30))
    assert rules(history) == ["wrong-bytes"]


def test_a_close_claimed_before_the_end() -> None:
    history, _ = history_of([30, 100])
    content = history.incarnations[("n0", 1)].final
    assert content is not None
    short = read(0, content[:30], 30)
    short.closed_claim = True
    history.reads.append(short)
    assert rules(history) == ["closed-short"]


def test_bytes_of_an_incarnation_deleted_before_the_read() -> None:
    history, _ = history_of([30, 100])
    inc = history.incarnations[("n0", 1)]
    inc.ended = "deleted"
    assert inc.final is not None
    late = read(0, inc.final[:30], 30)
    late.gone = 1
    history.reads.append(late)
    assert rules(history) == ["served-deleted"]


def test_a_resumed_reader_keeps_its_incarnation() -> None:
    history, _ = history_of([30, 100], number=1)
    again, _ = history_of([40, 90], number=2)
    history.appends.update(again.appends)
    history.incarnations.update(again.incarnations)
    old = history.incarnations[("n0", 1)].final
    new = history.incarnations[("n0", 2)].final
    assert old is not None and new is not None
    resumed = read(30, new[30:130], 130, session=2, incs=(2,))
    resumed.parent = 1
    history.reads += [read(0, old[:30], 30, incs=(1,)), resumed]
    assert rules(history) == ["incarnation-mix"]
