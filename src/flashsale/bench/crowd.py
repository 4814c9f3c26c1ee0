"""The bench's buyers in processes of their own, so that they measure the server and not their own core.

One Python process spends its one core on its buyers' requests: with the buyers in the process that runs
the bench, the bench measured its load generator (about a third of what wrk got from the same producer).
`run_crowd` starts `processes` children (spawned: nothing of the parent's threads or connections comes
along), each running bench/load.py's `run_load` on uvloop for its share of the buyers (buyer b in
process b mod processes, with all of its attempts), all from one start on the shared monotonic clock,
and merges their reports. Each child's payments are its own `Payers`; their reports are merged too.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.sharedctypes import Synchronized

from flashsale.bench.load import MAX_ERRORS, LoadReport, Share, merge, run_load
from flashsale.bench.payers import Payers, PaymentReport
from flashsale.errors import FlashSaleError

#: Buyer processes by default: on this machine's 2 cores, one process keeps up with one producer (see
#: docs/performance.md); more would take cores from the server being measured.
DEFAULT_PROCESSES = 1
#: Longest wait for the children to import and say they are ready.
READY_TIMEOUT_S = 60.0
#: How long the sale starts after every child is ready (so that none starts late).
START_MARGIN_S = 0.05


@dataclass(frozen=True)
class Crowd:
    """What every child needs to run its share (picklable)."""

    base_url: str
    skus: tuple[str, ...]
    attempts: int
    concurrency: int
    rate: float | None = None
    qty: int = 1
    run_id: str = ""
    timeout_s: float = 30.0
    payers: Payers | None = None


def run_crowd(
    crowd: Crowd, *, processes: int = DEFAULT_PROCESSES, tick: Callable[[], None] = lambda: None
) -> LoadReport:
    """The crowd's sale from `processes` children; `tick` is called here once per answer they got. With
    payers, `crowd.payers.report` holds every child's payments afterwards."""
    processes = max(1, min(processes, crowd.concurrency, crowd.attempts))
    crowd = replace(crowd, run_id=crowd.run_id or uuid.uuid4().hex[:8])  # one run: tokens unique across children
    context = multiprocessing.get_context("spawn")
    children = []
    for index in range(processes):
        ours, theirs = context.Pipe()
        counter = context.Value("q", 0, lock=False)
        child = context.Process(target=_child, args=(crowd, index, processes, theirs, counter), daemon=True)
        child.start()
        theirs.close()
        children.append((child, ours, counter))
    try:
        return _run(crowd, children, tick)
    finally:
        for child, ours, _ in children:
            ours.close()
            child.join(5)
            if child.is_alive():
                child.kill()


_Children = Sequence["tuple[multiprocessing.process.BaseProcess, Connection, Synchronized[int]]"]


def _run(crowd: Crowd, children: _Children, tick: Callable[[], None]) -> LoadReport:
    deadline = time.monotonic() + READY_TIMEOUT_S
    for _, ours, _ in children:
        if not ours.poll(max(0.0, deadline - time.monotonic())):
            raise FlashSaleError(f"the buyers' processes were not ready within {READY_TIMEOUT_S:g} s")
        _expect(ours.recv(), "ready")
    started = time.perf_counter() + START_MARGIN_S
    for _, ours, _ in children:
        ours.send(started)
    results: dict[int, tuple[LoadReport, PaymentReport | None]] = {}
    ticked = 0
    pipes = {id(ours): (i, ours) for i, (_, ours, _) in enumerate(children)}
    while len(results) < len(children):
        for ready in wait([p for _, p in pipes.values()], timeout=0.1):
            index, pipe = pipes.pop(id(ready))
            results[index] = _expect(pipe.recv(), "done")  # type: ignore[assignment]
        answered = sum(counter.value for _, _, counter in children)
        for _ in range(answered - ticked):
            tick()
        ticked = answered
    if crowd.payers is not None:
        crowd.payers.report = _merge_payments([p for _, p in results.values() if p is not None])
    return merge([report for report, _ in results.values()])


def _expect(message: tuple[str, object], kind: str) -> object:
    what, payload = message
    if what != kind:
        raise FlashSaleError(f"a buyers' process failed: {payload}")
    return payload


def _merge_payments(reports: Sequence[PaymentReport]) -> PaymentReport:
    merged = PaymentReport()
    for r in reports:
        merged.unpaid += r.unpaid
        merged.decisions.update(r.decisions)
        merged.latencies_s += r.latencies_s
        merged.errors += r.errors[: max(0, MAX_ERRORS - len(merged.errors))]
    return merged


def _child(crowd: Crowd, index: int, of: int, pipe: Connection, counter: Synchronized[int]) -> None:
    import uvloop

    # A short-lived process that keeps every answer: the collector would scan a heap that only grows, for
    # cycles the load does not make.
    gc.disable()

    try:
        pipe.send(("ready", None))
        started = pipe.recv()

        def tick() -> None:
            counter.value += 1

        payers = crowd.payers  # this child's own, unpickled with the crowd
        report = uvloop.run(
            run_load(
                crowd.base_url,
                crowd.skus,
                attempts=crowd.attempts,
                concurrency=crowd.concurrency,
                rate=crowd.rate,
                qty=crowd.qty,
                run_id=crowd.run_id,
                timeout_s=crowd.timeout_s,
                tick=tick,
                after_accepted=payers,
                share=Share(index, of, started),
            )
        )
        pipe.send(("done", (report, payers.report if payers is not None else None)))
    except BaseException:  # noqa: BLE001 (said to the parent, which fails the sale with it)
        pipe.send(("error", traceback.format_exc(limit=5)))
