from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from flashsale.models import PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline.grouping import Grouper


def _request(sku: str, token: str) -> PurchaseRequest:
    return PurchaseRequest(sku, "u1", 1, token)


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.groups: list[tuple[str, list[str], float]] = []
        self.fail = fail

    async def handle(self, sku: str, requests: Sequence[PurchaseRequest]) -> list[PurchaseResult]:
        self.groups.append((sku, [r.token for r in requests], time.monotonic()))
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("a bug")
        return [PurchaseResult(PurchaseStatus.ACCEPTED, r.token) for r in requests]


def _submit_all(grouper: Grouper, requests: list[PurchaseRequest]) -> list[PurchaseResult]:
    async def run() -> list[PurchaseResult]:
        return list(await asyncio.gather(*(grouper.submit(r) for r in requests)))

    return asyncio.run(run())


def test_a_group_closes_at_its_size_and_each_purchase_gets_its_own_answer() -> None:
    recorder = Recorder()
    grouper = Grouper(recorder.handle, size=2, wait_s=10)
    results = _submit_all(grouper, [_request("s", t) for t in ("a", "b", "c", "d")])
    assert [r.token for r in results] == ["a", "b", "c", "d"]
    assert [tokens for _, tokens, _ in recorder.groups] == [["a", "b"], ["c", "d"]]


def test_a_group_that_does_not_fill_closes_after_its_wait() -> None:
    recorder = Recorder()
    grouper = Grouper(recorder.handle, size=100, wait_s=0.05)
    started = time.monotonic()
    results = _submit_all(grouper, [_request("s", "a"), _request("s", "b")])
    assert [r.status for r in results] == [PurchaseStatus.ACCEPTED] * 2
    assert [tokens for _, tokens, _ in recorder.groups] == [["a", "b"]]
    assert 0.04 <= recorder.groups[0][2] - started < 1.0


def test_each_sku_has_groups_of_its_own() -> None:
    recorder = Recorder()
    grouper = Grouper(recorder.handle, size=10, wait_s=0.01)
    _submit_all(grouper, [_request("x", "a"), _request("y", "b"), _request("x", "c")])
    assert sorted((sku, tokens) for sku, tokens, _ in recorder.groups) == [("x", ["a", "c"]), ("y", ["b"])]


def test_a_size_of_one_sends_every_purchase_at_once() -> None:
    recorder = Recorder()
    grouper = Grouper(recorder.handle, size=1, wait_s=10)
    started = time.monotonic()
    _submit_all(grouper, [_request("s", "a"), _request("s", "b")])
    assert [tokens for _, tokens, _ in recorder.groups] == [["a"], ["b"]]
    assert time.monotonic() - started < 1.0


def test_a_group_whose_handler_fails_unexpectedly_is_answered_pending_not_error() -> None:
    grouper = Grouper(Recorder(fail=True).handle, size=2, wait_s=10)
    results = _submit_all(grouper, [_request("s", "a"), _request("s", "b")])
    # Whether its pre-deduct ran is unknown: the buyers ask again with their tokens.
    assert [r.status for r in results] == [PurchaseStatus.PENDING] * 2


def test_a_token_twice_in_the_window_waits_for_its_first_group_and_joins_a_later_one() -> None:
    recorder = Recorder()
    grouper = Grouper(recorder.handle, size=10, wait_s=0.01)
    first, again = PurchaseRequest("s", "u1", 1, "a"), PurchaseRequest("s", "u1", 2, "a")
    results = _submit_all(grouper, [first, _request("s", "b"), again, _request("s", "c")])
    assert [r.token for r in results] == ["a", "b", "a", "c"]
    # One message never carries a token twice: the double click went with the next group, once the first
    # had its answer.
    assert [tokens for _, tokens, _ in recorder.groups] == [["a", "b", "c"], ["a"]]
    assert all(len(set(tokens)) == len(tokens) for _, tokens, _ in recorder.groups)


class Gate:
    """A handler that holds each group until the test lets it go: one (`releases[i]`, in the order the
    groups came), or every group, those to come too (`open`)."""

    def __init__(self, status: PurchaseStatus = PurchaseStatus.SOLD_OUT) -> None:
        self.groups: list[list[str]] = []
        self.releases: list[asyncio.Event] = []
        self._status = status
        self._opened = False

    async def handle(self, sku: str, requests: Sequence[PurchaseRequest]) -> list[PurchaseResult]:
        self.groups.append([r.token for r in requests])
        release = asyncio.Event()
        self.releases.append(release)
        if self._opened:
            release.set()
        await release.wait()
        return [PurchaseResult(self._status, r.token) for r in requests]

    def open(self) -> None:
        self._opened = True
        for release in self.releases:
            release.set()


def test_an_eager_skus_group_closes_at_once_and_the_next_as_soon_as_the_last_is_answered() -> None:
    gate = Gate()
    grouper = Grouper(gate.handle, size=100, wait_s=30, eager=lambda sku: sku == "gone")

    async def run() -> list[PurchaseResult]:
        first = asyncio.ensure_future(grouper.submit(_request("gone", "a")))
        await asyncio.sleep(0.01)
        assert gate.groups == [["a"]]  # closed without its 30 s wait
        # Purchases arriving while a group is read gather; the timer is not what closes their group.
        later = [asyncio.ensure_future(grouper.submit(_request("gone", t))) for t in ("b", "c")]
        await asyncio.sleep(0.01)
        assert gate.groups == [["a"]]
        gate.open()
        return list(await asyncio.wait_for(asyncio.gather(first, *later), 5))

    started = time.monotonic()
    results = asyncio.run(run())
    assert [r.token for r in results] == ["a", "b", "c"]
    assert gate.groups == [["a"], ["b", "c"]]
    assert time.monotonic() - started < 5


def test_a_sku_that_is_not_eager_still_waits_for_its_group_to_fill_or_its_timer() -> None:
    gate = Gate()
    gate.open()
    grouper = Grouper(gate.handle, size=100, wait_s=0.3, eager=lambda sku: sku == "gone")

    async def run() -> float:
        started = time.monotonic()
        await grouper.submit(_request("live", "a"))
        return time.monotonic() - started

    assert asyncio.run(run()) >= 0.25
    assert gate.groups == [["a"]]


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time given"
        await asyncio.sleep(0.005)


def test_a_group_whose_wait_is_up_while_one_of_its_sku_is_under_way_closes_as_that_one_is_answered() -> None:
    gate = Gate()
    grouper = Grouper(gate.handle, size=100, wait_s=0.01, hold_s=30)

    async def run() -> list[PurchaseResult]:
        first = asyncio.ensure_future(grouper.submit(_request("s", "a")))
        await _until(lambda: gate.groups == [["a"]])  # nothing under way: it closed at its wait
        later = [asyncio.ensure_future(grouper.submit(_request("s", t))) for t in ("b", "c")]
        await asyncio.sleep(0.1)  # ten times its wait
        assert gate.groups == [["a"]]  # held while "a" is under way
        later.append(asyncio.ensure_future(grouper.submit(_request("s", "d"))))  # still joins it
        await asyncio.sleep(0.01)
        gate.open()
        return list(await asyncio.wait_for(asyncio.gather(first, *later), 5))

    started = time.monotonic()
    results = asyncio.run(run())
    assert [r.token for r in results] == ["a", "b", "c", "d"]
    assert gate.groups == [["a"], ["b", "c", "d"]]
    assert time.monotonic() - started < 5  # closed by the answer, not by its 30 s bound


def test_a_held_group_closes_at_its_bound_behind_a_slow_transaction_or_at_its_size() -> None:
    gate = Gate()
    grouper = Grouper(gate.handle, size=3, wait_s=0.01, hold_s=1.0)

    async def run() -> list[PurchaseResult]:
        first = asyncio.ensure_future(grouper.submit(_request("s", "a")))
        await _until(lambda: gate.groups == [["a"]])
        held_at = time.monotonic()
        second = asyncio.ensure_future(grouper.submit(_request("s", "b")))
        await asyncio.sleep(0.1)
        assert gate.groups == [["a"]]
        await _until(lambda: len(gate.groups) == 2)  # "a" is still under way: the bound closed it
        assert gate.groups == [["a"], ["b"]]
        assert time.monotonic() - held_at >= 0.9
        full = [asyncio.ensure_future(grouper.submit(_request("s", t))) for t in ("c", "d")]
        await asyncio.sleep(0.1)
        assert len(gate.groups) == 2  # held: "a" and "b" are under way
        full.append(asyncio.ensure_future(grouper.submit(_request("s", "e"))))
        await _until(lambda: len(gate.groups) == 3)  # filled: closed at its size, long before its bound
        assert gate.groups[2] == ["c", "d", "e"]
        assert time.monotonic() - held_at < 1.9
        gate.open()
        return list(await asyncio.wait_for(asyncio.gather(first, second, *full), 5))

    assert [r.token for r in asyncio.run(run())] == ["a", "b", "c", "d", "e"]


def test_without_a_hold_or_for_another_sku_a_group_closes_at_its_wait_beside_one_under_way() -> None:
    for hold_s, second_sku in ((0.0, "s"), (30.0, "other")):
        gate = Gate()
        grouper = Grouper(gate.handle, size=100, wait_s=0.01, hold_s=hold_s)

        async def run(grouper: Grouper, gate: Gate, sku: str) -> None:
            first = asyncio.ensure_future(grouper.submit(_request("s", "a")))
            await _until(lambda: gate.groups == [["a"]])
            second = asyncio.ensure_future(grouper.submit(_request(sku, "b")))
            await _until(lambda: gate.groups == [["a"], ["b"]])  # "a" is still under way
            gate.open()
            await asyncio.wait_for(asyncio.gather(first, second), 5)

        asyncio.run(run(grouper, gate, second_sku))


def test_an_eager_skus_group_is_not_held_its_wait_still_bounds_it() -> None:
    gate = Gate()
    grouper = Grouper(gate.handle, size=100, wait_s=0.01, hold_s=30, eager=lambda sku: sku == "gone")

    async def run() -> None:
        first = asyncio.ensure_future(grouper.submit(_request("gone", "a")))
        await _until(lambda: gate.groups == [["a"]])
        second = asyncio.ensure_future(grouper.submit(_request("gone", "b")))
        await _until(lambda: gate.groups == [["a"], ["b"]])  # at its wait, though "a" is still being read
        gate.open()
        await asyncio.wait_for(asyncio.gather(first, second), 5)

    asyncio.run(run())


def test_a_held_group_closes_at_the_first_answer_of_its_sku_once_and_leaves_nothing_behind() -> None:
    gates = Gate(PurchaseStatus.ACCEPTED)
    grouper = Grouper(gates.handle, size=100, wait_s=0.01, hold_s=1.0)

    async def run() -> list[PurchaseResult]:
        a = asyncio.ensure_future(grouper.submit(_request("s", "a")))
        await _until(lambda: gates.groups == [["a"]])
        b = asyncio.ensure_future(grouper.submit(_request("s", "b")))
        await _until(lambda: len(gates.groups) == 2)  # held, then closed by its bound: "a" is still under way
        c = asyncio.ensure_future(grouper.submit(_request("s", "c")))
        await asyncio.sleep(0.1)
        assert gates.groups == [["a"], ["b"]]  # held behind "a" and "b"
        released = time.monotonic()
        gates.releases[0].set()  # "a" answered, "b" still under way
        await _until(lambda: len(gates.groups) == 3)
        assert gates.groups[2] == ["c"]
        assert time.monotonic() - released < 0.5  # by that answer, not by its bound 0.9 s later
        gates.open()
        answers = list(await asyncio.wait_for(asyncio.gather(a, b, c), 5))
        await asyncio.sleep(1.2)  # past the bound "c" was held for: it must not close it again
        return answers

    assert [r.status for r in asyncio.run(run())] == [PurchaseStatus.ACCEPTED] * 3
    assert gates.groups == [["a"], ["b"], ["c"]]
    assert grouper.idle and not grouper._handling


def test_a_group_whose_handler_is_cancelled_answers_pending_and_holds_no_later_group() -> None:
    calls: list[list[str]] = []

    async def handle(sku: str, requests: Sequence[PurchaseRequest]) -> list[PurchaseResult]:
        calls.append([r.token for r in requests])
        if len(calls) == 1:
            raise asyncio.CancelledError  # a gRPC call cancelled under it, say
        return [PurchaseResult(PurchaseStatus.ACCEPTED, r.token) for r in requests]

    grouper = Grouper(handle, size=100, wait_s=0.01, hold_s=30)

    async def run() -> tuple[PurchaseResult, PurchaseResult]:
        first = await asyncio.wait_for(grouper.submit(_request("s", "a")), 5)
        second = await asyncio.wait_for(grouper.submit(_request("s", "b")), 5)  # not held for 30 s
        return first, second

    first, second = asyncio.run(run())
    assert (first.status, second.status) == (PurchaseStatus.PENDING, PurchaseStatus.ACCEPTED)
    assert calls == [["a"], ["b"]]
    assert grouper.idle and not grouper._handling
