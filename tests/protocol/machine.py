"""A stateful search of the purchase protocol over the real Lua scripts on a real Redis.

Hypothesis drives simulated producers (the product's own PurchaseService, Scheduler and Redis adapters,
each on a broker model) and a checker through the protocol's steps, in any order: groups of purchases
with repeated tokens, mixed quantities and users; a producer stalled after its half message or before
its commit, then resumed or killed; every step of a refill or a drain on its own, run again as a caller
whose reply was lost would; a sweep with a skewed clock; the checker's check and fence; a reload with
more or fewer partitions; a producer that dies and forgets its memory; on a SKU sold with a payment
deadline, payments, cancels and expiries of its orders (on its partitions, open or closed), stalled and
resumed like a purchase; and, on a Redis Cluster, a failover to a replica that missed the last writes.

After every step the books are read back with plain Redis commands (tests/protocol/books.py, no code of
the product's) and these must hold:

- units are conserved: loaded = on sale in the partitions + pool + transfers under way + deducted (an
  order cancelled or expired has its units back on sale);
- no token is deducted twice, and no user holds more than the limit;
- every token a buyer was told `accepted` or `duplicate` is deducted in the surviving state (or given back
  since), by a message the broker did not roll back;
- a purchase asked again as it was deducted (token, buyer, quantity) never hears `sold_out`;
- an order ends once: paid (its units still sold) or cancelled or expired (its units given back), never
  otherwise after; its decision's message is not rolled back, and a decision answered with a message is
  the one the log records;
- the checker never rolls back a message whose pre-deduct (or decision) the log records, nor commits one
  it does not.

At the end every message still open is settled by the checker, and each deduction must then be carried
by exactly one committed message, as the consumer would apply it, with no conflict; and each decision
by its own committed message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from redis.crc import key_slot

from flashsale import constants as c
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.errors import BusError, FlashSaleError, NotReplicated
from flashsale.models import SOURCE_DECISION, DeductionMessage, Delivery, PurchaseRequest, PurchaseResult, Resolution
from flashsale.pipeline import accepted, partitions
from flashsale.pipeline.accepted import Decoded
from flashsale.pipeline.checker import DeductionChecker
from flashsale.pipeline.orders import OrderAnswer, OrderDesk
from flashsale.pipeline.partitions import Scheduler
from flashsale.pipeline.producer import PurchaseService
from flashsale.records import Decision, Layout
from tests.oracle import redis_client
from tests.protocol import books
from tests.protocol.cluster import Failovers

TOKENS = tuple(f"t{i}" for i in range(4))
USERS = ("u0", "u1")
PRODUCERS = 2
#: A grace no message of a run reaches (the checker answers unknown), and one every message is past.
YOUNG_MS, OLD_MS = 3_600_000, 0
HOUR_S = 3600.0
#: Payment deadlines of a load: an hour (payments and cancels decide), due at once (expiries and cancels
#: do), none (orders final on acceptance).
PAY_WITHIN_MS = (3_600_000, 1, 0)
#: How each decision ends an order, when it is the one that decides it.
ENDS = {Decision.PAID: "paid", Decision.CANCELLED: "cancelled", Decision.EXPIRED: "expired"}

purchases_st = st.lists(
    st.tuples(st.sampled_from(TOKENS), st.sampled_from(USERS), st.integers(1, 3)), min_size=1, max_size=4
)


# --- the broker, as a model ---------------------------------------------------------------------------
@dataclass
class Message:
    gid: str
    body: bytes
    born_ms: int
    state: str = "half"  # half, committed, rolled_back: the first end wins, as on the broker

    @property
    def decoded(self) -> DeductionMessage:
        return DeductionMessage.decode(self.body, self.gid)


@dataclass
class Stall:
    """Where the next group of a producer stops: after its half message, or before its end."""

    where: str  # "half" or "end"
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    gid: str = ""


class ModelBus:
    """The broker as the protocol sees it: half messages, each ended once (commit or roll back)."""

    def __init__(self, machine: ProtocolMachine) -> None:
        self._machine = machine
        self.stall: Stall | None = None
        self.lose_end = False
        self.down = False  # the broker takes no half message: the producer answers `error`

    def new_message_id(self) -> str:
        self._machine.ids += 1
        return f"m{self._machine.ids}"

    async def send_half_async(self, topic: str, key: str, body: bytes, tag: str, message_id: str | None = None) -> Any:
        if self.down:
            raise BusError("the broker is out of reach")
        gid = message_id or self.new_message_id()
        self._machine.messages[gid] = Message(gid, body, int(time.time() * 1000))
        stall, self.stall = (self.stall, None) if self.stall and self.stall.where == "half" else (None, self.stall)
        if stall:
            await self._wait(stall, gid)
        return _Half(self, gid)

    async def end(self, gid: str, state: str) -> None:
        if self.stall and self.stall.where == "end":
            stall, self.stall = self.stall, None
            await self._wait(stall, gid)
        if self.lose_end:
            raise BusError("the end of the transaction was lost")
        self._machine.end(gid, state)

    async def _wait(self, stall: Stall, gid: str) -> None:
        stall.gid = gid
        stall.reached.set()
        await stall.go.wait()


@dataclass
class _Half:
    bus: ModelBus
    message_id: str

    async def commit(self) -> None:
        await self.bus.end(self.message_id, "committed")

    async def rollback(self) -> None:
        await self.bus.end(self.message_id, "rolled_back")


@dataclass
class ManualClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class Producer:
    """One producer process: its Redis clients, scheduler (with its caches) and purchase service."""

    def __init__(self, machine: ProtocolMachine, n: int) -> None:
        self.n = n
        self.clock = ManualClock()
        self.stock = AsyncRedisStock(machine.url, wait_ms=machine.wait_ms, timeout_s=2.0)
        self.scheduler = Scheduler(self.stock, clock=self.clock)
        self.bus = ModelBus(machine)
        self.service = PurchaseService(
            self.stock,
            self.bus,  # type: ignore[arg-type]
            "deductions",
            group_size=64,
            group_wait_s=0.001,
            # Producer 0 reads every group first; producer 1 trusts what it last saw of a SKU's stock until
            # time passes (a SKU in stock goes straight to its transaction): the search takes both paths.
            sold_out_cache_s=0.0 if n == 0 else HOUR_S / 2,
            # Its seals too, on its clock; Redis keeps them half an hour and a second: no example sees one
            # end, so a run replays the same way.
            seal_cap_s=HOUR_S / 2,
            scheduler=self.scheduler,
            clock=self.clock,
        )
        self.orders = OrderDesk(self.stock, self.bus, "deductions")  # type: ignore[arg-type]
        self.groups: list[asyncio.Task[Any]] = []

    def cached_layout(self, sku: str) -> Layout | None:
        cached = self.scheduler._layouts.get(sku)
        return cached[1] if cached else None

    async def close(self) -> None:
        """The process dies: its groups in flight stop where they are."""
        doomed = [*self.groups, *self.service._grouper._running, *self.service._sold_out.sealing.values()]
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        await self.scheduler.close()
        await self.stock.close()


@dataclass
class TransferStep:
    """A refill or drain begun by a producer, with the layout it was begun by; its steps run one by one."""

    id: str
    kind: str  # "refill" or "drain"
    layout: Layout
    part: str
    want: int
    begun: bool = False  # step 1 answered
    given: int | None = None  # the units a refill's step 2 gave, once answered
    qty: int | None = None  # the units that move: step 1's answer (refill), step 2's (drain)


class ProtocolMachine(RuleBasedStateMachine):
    """Subclassed with the Redis to run on (see tests/protocol/test_protocol.py)."""

    url: str = ""
    wait_ms: int = 0
    #: Examples begun and steps taken, by every machine of this process (`make fuzz` reports them).
    examples: int = 0
    steps: int = 0
    #: Reloads discard a sale mid-way; a search for other defects can leave them out.
    reloads: bool = True
    #: Groups may carry one token twice (a double click within the group's window).
    group_repeats: bool = True
    #: Steps of refills and drains on their own, and sweeps.
    transfer_steps: bool = True
    #: Per-user limits.
    limits: bool = True
    failovers: Failovers | None = None

    def __init__(self) -> None:
        super().__init__()
        ProtocolMachine.examples += 1
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.sku = ""
        self.home = 0
        self.sync = RedisStock(self.url, wait_ms=self.wait_ms, timeout_s=2.0)
        self.raw = redis_client(self.url)
        self.ids = 0
        self.load = 0
        self.initial = 0
        self.limit = 0
        self.parts = 1
        self.messages: dict[str, Message] = {}
        self.loads: dict[asyncio.Task[PurchaseResult], int] = {}
        self.told: dict[str, list[tuple[str, str | None]]] = {}  # token -> (status, message id) this load
        self.deciding: dict[asyncio.Task[OrderAnswer], tuple[str, int]] = {}  # a decision -> its token, load
        self.decided: dict[str, list[OrderAnswer]] = {}  # token -> the answers of its decisions, this load
        self.ends: dict[str, str] = {}  # token -> how its order ended, as first seen (this load)
        self.pay_within = 0
        self.producers = [Producer(self, n) for n in range(PRODUCERS)]
        self.transfers: list[TransferStep] = []
        self.stalls: list[tuple[Producer, Stall, list[asyncio.Task[PurchaseResult]]]] = []
        self.checker = DeductionChecker(self.sync, 0)

    # --- the sale ------------------------------------------------------------------------------------
    @initialize(
        qty=st.integers(1, 12),
        parts=st.sampled_from((1, 2, 3)),
        limit=st.sampled_from((0, 1, 2)),
        refill=st.integers(1, 4),
        threshold=st.integers(0, 2),
        home=st.integers(0, 2),
        pay_within=st.sampled_from(PAY_WITHIN_MS),
    )
    def load_stock(
        self, qty: int, parts: int, limit: int, refill: int, threshold: int, home: int, pay_within: int
    ) -> None:
        """A SKU never used before, on the `home`-th master of a cluster, loaded for a sale."""
        self.home = home
        self.sku = self._fresh_sku(home)
        self._load(qty, parts, limit if self.limits else 0, refill, threshold, pay_within)

    def _fresh_sku(self, home: int) -> str:
        """The example's SKU, with nothing left of an earlier example's. Its name is the same in every
        example on the same master: the name decides the partitions' names and where each token sells,
        so a random one would make a run that found something take other paths when replayed."""
        if self.failovers is None:
            sku = "pm"
        else:
            lo, hi = self.failovers.home(home)
            sku = next(f"pm-{n}" for n in range(100_000) if lo <= key_slot(f"pm-{n}".encode()) <= hi)
        for pattern in (f"fs:{{{sku}}}:*", f"fs:{{{sku}#*"):  # the SKU's keys and its partitions'
            for key in list(self.raw.scan_iter(match=pattern, count=1000)):
                self.raw.delete(key)
        return sku

    def _load(self, qty: int, parts: int, limit: int, refill: int, threshold: int, pay_within: int) -> None:
        if parts == 1:
            self.sync.load(self.sku, qty, per_user_limit=limit, reset=True, pay_within_ms=pay_within)
        else:
            self.sync.load_partitioned(
                self.sku,
                qty,
                partitions=parts,
                refill=refill,
                threshold=threshold,
                per_user_limit=limit,
                reset=True,
                pay_within_ms=pay_within,
            )
        self.load += 1
        self.initial, self.limit, self.pay_within, self.parts = qty, limit, pay_within, parts
        self.told, self.decided, self.ends = {}, {}, {}

    @rule(
        p=st.integers(0, PRODUCERS - 1),
        items=purchases_st,
        stall=st.sampled_from(("", "", "", "half", "end", "down")),
        lose_end=st.booleans(),
    )
    def buy(self, p: int, items: list[tuple[str, str, int]], stall: str, lose_end: bool) -> None:
        """A group of purchases sent at once to one producer: each buyer hears an answer, unless the
        producer stalls (after the half message, or before its commit or roll back). With the broker
        down, the half message is refused and the buyers hear `error`."""
        producer = self.producers[p]
        producer.bus.lose_end = lose_end
        producer.bus.down = stall == "down"
        producer.bus.stall = Stall(stall) if stall in ("half", "end") else None
        if not self.group_repeats:
            items = list({token: (token, user, qty) for token, user, qty in items}.values())
        requests = [PurchaseRequest(self.sku, user, qty, token) for token, user, qty in items]
        held = {t: (e["user"], int(e["qty"])) for t, e in books.read(self.raw, self.sku).ever.items()}
        tasks = [self.loop.create_task(producer.service.submit(r)) for r in requests]
        for task in tasks:
            self.loads[task] = self.load  # what the buyers hear belongs to the load they bought in
        producer.groups += tasks
        watched = producer.bus.stall
        self._run_until(tasks, watched)
        if watched is not None and watched.reached.is_set():
            self.stalls.append((producer, watched, tasks))
        else:
            producer.bus.stall = None
            self._collect(tasks)
            self._check_no_refusal_of(held, requests, tasks)
        producer.bus.down = False
        self._settle_background()

    @staticmethod
    def _check_no_refusal_of(
        held: dict[str, tuple[str, int]], requests: Sequence[PurchaseRequest], tasks: Sequence[asyncio.Task[Any]]
    ) -> None:
        """A purchase asked again as it was deducted before it was sent (its token, buyer and quantity; even
        if given back since) never hears `sold_out`: its buyer hears its original answer (`duplicate`), or
        one to ask again with."""
        for request, task in zip(requests, tasks, strict=True):
            if task.done() and not task.cancelled():
                result = task.result()
                again = held.get(request.token) == (request.user_id, request.qty)
                assert not (again and result.status.value == "sold_out"), f"{request}, deducted before: {result}"

    @precondition(lambda self: bool(self.stalls))
    @rule(data=st.data(), lose_end=st.booleans())
    def resume(self, data: st.DataObject, lose_end: bool) -> None:
        """A stalled producer goes on (late): its pre-deduct runs now, or its end reaches the broker."""
        producer, stall, tasks = data.draw(st.sampled_from(self.stalls))
        self.stalls.remove((producer, stall, tasks))
        producer.bus.lose_end = lose_end
        stall.go.set()
        self._run_until(tasks, None)
        self._collect(tasks)
        self._settle_background()

    @precondition(lambda self: bool(self._held()))
    @rule(p=st.integers(0, PRODUCERS - 1), data=st.data())
    def ask_again(self, p: int, data: st.DataObject) -> None:
        """A buyer told they hold a token asks again, the same purchase (an answer lost on its way)."""
        token = data.draw(st.sampled_from(self._held()))
        entry = books.read(self.raw, self.sku).ever.get(token)
        if entry is not None:  # (else lost with a failover: the books' checks judge that)
            self.buy(p, [(token, entry["user"], int(entry["qty"]))], "", False)

    def _held(self) -> list[str]:
        """The tokens of this load a buyer was told they hold."""
        return sorted(t for t, said in self.told.items() if any(s in ("accepted", "duplicate") for s, _ in said))

    @precondition(lambda self: bool(self._held()))
    @rule(
        p=st.integers(0, PRODUCERS - 1),
        data=st.data(),
        action=st.sampled_from(("pay", "cancel", "expire")),
        user=st.sampled_from(USERS),
        decision_id=st.sampled_from(("d0", "d1")),
        stall=st.sampled_from(("", "", "", "half", "end")),
        lose_end=st.booleans(),
    )
    def decide(
        self, p: int, data: st.DataObject, action: str, user: str, decision_id: str, stall: str, lose_end: bool
    ) -> None:
        """A payment, a buyer's cancel or an expiry of the order of a token a buyer was told they hold,
        through a producer's order desk: the same transaction as a purchase, stalled or with its end lost
        the same ways."""
        token = data.draw(st.sampled_from(self._held()))
        if self.pay_within == 1:
            # Past every deadline of the load for sure: an order bought in this very millisecond would not
            # be due yet, and a run replayed would take another path (Hypothesis could not shrink it).
            time.sleep(0.002)
        producer = self.producers[p]
        producer.bus.lose_end = lose_end
        producer.bus.stall = Stall(stall) if stall else None
        decision = c.EXPIRY_DECISION if action == "expire" else decision_id
        task = self.loop.create_task(
            producer.orders.decide(
                self.sku, token, action, decision_id=decision, user=user if action == "cancel" else ""
            )
        )
        self.deciding[task] = (token, self.load)
        producer.groups.append(task)
        watched = producer.bus.stall
        self._run_until([task], watched)
        if watched is not None and watched.reached.is_set():
            self.stalls.append((producer, watched, [task]))
        else:
            producer.bus.stall = None
            self._collect([task])
        self._settle_background()

    @rule(p=st.integers(0, PRODUCERS - 1))
    def restart(self, p: int) -> None:
        """A producer dies (its stalled groups with it: their buyers never hear) and a new one starts."""
        old = self.producers[p]
        self.stalls = [s for s in self.stalls if s[0] is not old]
        self.loop.run_until_complete(old.close())
        self.producers[p] = Producer(self, p)

    @rule(p=st.integers(0, PRODUCERS - 1))
    def time_passes(self, p: int) -> None:
        """A producer's caches (layout, registry, a seal it trusted) expire. Once no producer trusts a seal
        of the SKU, Redis's ends too, as it would a second later (here it lasts half an hour of real time)."""
        self.producers[p].clock.now += HOUR_S
        if not any(q.service._sold_out.trusts(self.sku) for q in self.producers):
            parts = self.raw.hget(f"fs:{{{self.sku}}}:meta", "parts") or ""
            for shard in [self.sku, *parts.split()]:
                self.raw.hdel(f"fs:{{{shard}}}:meta", "sealed_until", "sealed_since")

    @precondition(lambda self: any(m.state == "half" for m in self.messages.values()))
    @rule(data=st.data(), old=st.booleans())
    def check(self, data: st.DataObject, old: bool) -> None:
        """The broker asks the checker about a message still open; a message past the grace is fenced."""
        message = data.draw(
            st.sampled_from(sorted((m for m in self.messages.values() if m.state == "half"), key=lambda m: m.gid))
        )
        self.checker._grace_ms = OLD_MS if old else YOUNG_MS
        delivery = Delivery(message.gid, "deductions", None, message.body, message.born_ms, 1)
        verdict = self.checker.check(delivery)
        named = books.named_by(self.raw, message.decoded)
        if verdict is Resolution.ROLLBACK:
            assert not named, f"the checker rolled back {message.gid}, whose pre-deduct the log records: {named}"
            self.end(message.gid, "rolled_back")
        elif verdict is Resolution.COMMIT:
            assert named, f"the checker committed {message.gid}, whose pre-deduct the log does not record"
            self.end(message.gid, "committed")

    # --- moving stock between the pool and the partitions, one step at a time -------------------------
    def _layout_of(self, p: int) -> Layout | None:
        return self.producers[p].cached_layout(self.sku)

    @precondition(lambda self: self.transfer_steps)
    @rule(
        p=st.integers(0, PRODUCERS - 1),
        data=st.data(),
        want=st.integers(1, 4),
        kind=st.sampled_from(("refill", "drain")),
    )
    def begin_transfer(self, p: int, data: st.DataObject, want: int, kind: str) -> None:
        """Step 1 of a refill (taken from the pool) or a drain (recorded), by a producer's cached layout."""
        layout = self._layout_of(p)
        if layout is None:
            return
        step = TransferStep(f"x{len(self.transfers)}", kind, layout, data.draw(st.sampled_from(layout.parts)), want)
        self.transfers.append(step)
        self._step(step, "first")

    @precondition(lambda self: bool(self.transfers) and self.transfer_steps)
    @rule(data=st.data(), which=st.sampled_from(("first", "second", "third")))
    def transfer_step(self, data: st.DataObject, which: str) -> None:
        """Any step of a transfer, in any order, as often as a caller whose reply was lost would run it."""
        self._step(data.draw(st.sampled_from(self.transfers)), which)

    def _step(self, t: TransferStep, which: str) -> None:
        stock, layout, qty = self.producers[0].stock, t.layout, t.qty or 0
        calls: dict[tuple[str, str], Callable[[], Awaitable[Any]]] = {
            ("refill", "first"): lambda: stock.take(layout, t.id, t.part, t.want),
            ("refill", "second"): lambda: stock.give(layout, t.part, t.id, qty),
            ("refill", "third"): lambda: stock.end_refill(layout, t.id),
            ("drain", "first"): lambda: stock.expect(layout, t.id, t.part, t.want),
            ("drain", "second"): lambda: stock.drain(layout, t.part, t.id, t.want),
            ("drain", "third"): lambda: stock.receive(layout, t.id, qty),
        }
        # A caller runs a step only once it learned what the steps before it did.
        if which != "first" and not t.begun:
            return
        if (t.kind, which) in (("refill", "second"), ("drain", "third")) and t.qty is None:
            return
        if (t.kind, which) == ("refill", "third") and t.given != t.qty:
            return  # it ends a transfer once it gave what it knows step 1 took (step 1 run again may say more)
        try:
            answer = self.loop.run_until_complete(calls[(t.kind, which)]())
        except FlashSaleError:
            return
        if which == "first":
            t.begun = True
        if (t.kind, which) in (("refill", "first"), ("drain", "second")):
            t.qty = int(answer)
        if (t.kind, which) == ("refill", "second"):
            t.given = qty

    @precondition(lambda self: self.transfer_steps)
    @rule(
        p=st.integers(0, PRODUCERS - 1),
        skew=st.sampled_from((0.0, HOUR_S + 60)),
        age_ms=st.sampled_from((0, 3_600_000)),
    )
    def sweep(self, p: int, skew: float, age_ms: int) -> None:
        """A producer completes the transfers it judges abandoned (older than `age_ms`), its clock `skew` ahead."""
        layout = self._layout_of(p)
        if layout is None:
            return
        real = time.time
        with mock.patch.object(partitions.time, "time", lambda: real() + skew):
            self.loop.run_until_complete(self.producers[p].scheduler._sweep(layout, age_ms))

    @rule(p=st.integers(0, PRODUCERS - 1), data=st.data())
    def close_partition(self, p: int, data: st.DataObject) -> None:
        layout = self._layout_of(p)
        if layout is None:
            return
        with contextlib.suppress(FlashSaleError):
            self.loop.run_until_complete(
                self.producers[p].stock.close_partition(layout, data.draw(st.sampled_from(layout.parts)))
            )

    @precondition(lambda self: self.reloads)
    @rule(
        qty=st.integers(0, 12),
        parts=st.sampled_from((1, 2, 3)),
        limit=st.sampled_from((0, 1, 2)),
        refill=st.integers(1, 4),
    )
    def reload(self, qty: int, parts: int, limit: int, refill: int) -> None:
        """An operator loads the SKU again (discarding its history) while producers hold the old layout."""
        try:
            self._reload(qty, parts, limit, refill)
        except NotReplicated:
            # No replica holds the load yet, and a failover would undo it: the operator is told so, waits
            # for the replicas and runs it again.
            assert self.failovers is not None and self.failovers.lagging()
            self.failovers.heal()
            self._reload(qty, parts, limit, refill)

    def _reload(self, qty: int, parts: int, limit: int, refill: int) -> None:
        with self.sync.frozen(self.sku):  # as `stock set` does: no purchase lands while the history is read
            self._load(qty, parts, limit, refill, 0, PAY_WITHIN_MS[qty % len(PAY_WITHIN_MS)])

    # --- the books ----------------------------------------------------------------------------------
    def end(self, gid: str, state: str) -> None:
        message = self.messages[gid]
        if message.state == "half":
            message.state = state

    def _run_until(self, tasks: Sequence[asyncio.Task[Any]], stall: Stall | None) -> None:
        async def until() -> None:
            waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(asyncio.wait(tasks))]
            if stall is not None:
                waiters.append(asyncio.ensure_future(stall.reached.wait()))
            _, rest = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in rest:
                w.cancel()

        self.loop.run_until_complete(until())

    def _collect(self, tasks: Sequence[asyncio.Task[Any]]) -> None:
        for task in tasks:
            if not task.done() or task.cancelled():
                continue
            if task in self.deciding:
                # A decision that raised (its Redis call unclear, or its end lost) is settled by the checker.
                token, load = self.deciding.pop(task)
                if load == self.load and task.exception() is None:
                    self.decided.setdefault(token, []).append(task.result())
            elif self.loads.pop(task) == self.load:
                result = task.result()
                self.told.setdefault(result.token, []).append((result.status.value, result.message_id))

    def _settle_background(self) -> None:
        """Let the producers' background refills and sweeps finish, so each rule leaves no step half done."""

        async def idle() -> None:
            for _ in range(50):
                running = [
                    t for p in self.producers for t in (*p.scheduler._tasks, *p.service._sold_out.sealing.values())
                ]
                if not running:
                    return
                await asyncio.wait(running, timeout=5)

        self.loop.run_until_complete(idle())

    def _failover_allowed(self) -> bool:
        return self.failovers is not None

    # --- invariants -----------------------------------------------------------------------------------
    def check_books(self) -> None:
        state = books.read(self.raw, self.sku)
        assert state.negative == [], f"negative stock: {state.negative}"
        total = state.on_sale + state.moving + state.deducted_qty
        assert total == self.initial, (
            f"units not conserved: loaded {self.initial}, on sale {state.on_sale} (partitions {state.parts}, "
            f"pool {state.pool}), moving {state.moving}, deducted {state.deducted_qty}"
        )
        doubled = {t: where for t, where in state.where.items() if len(where) > 1}
        assert not doubled, f"tokens deducted twice: {doubled}"
        if self.limit:
            over = {u: n for u, n in state.by_user.items() if n > self.limit}
            assert not over, f"users past the limit of {self.limit}: {over}"
            if self.parts > 1:
                # A hold is given back only once no attempt of its token may deduct it: a standing
                # deduction always has its buyer's hold, at its quantity at least.
                bare = {
                    t: (e["user"], e["qty"], state.holds.get((t, e["user"])))
                    for t, e in state.entries.items()
                    if state.holds.get((t, e["user"]), 0) < int(e["qty"])
                }
                assert not bare, f"deductions without their buyer's hold (user, qty, held): {bare}"
        for token, said in self.told.items():
            holds = [s for s, _ in said if s in ("accepted", "duplicate")]
            if not holds:
                continue
            entry = state.ever.get(token)
            assert entry is not None, f"{token} was told {holds} but is not deducted: told {said}"
            message = self.messages.get(entry["msg"])
            assert message is None or message.state != "rolled_back", (
                f"{token} was told {holds}; its deduction's message {entry['msg']} was rolled back"
            )
        self._check_orders(state)

    def _check_orders(self, state: books.State) -> None:
        """An order ends once and stays so, its units given back only when it ends cancelled or expired; its
        decision's message is never rolled back; a decision answered with a message is the log's."""
        for token, entry in state.ever.items():
            end = entry.get("order")
            if end in (None, "awaiting"):
                assert entry["state"] == "deducted", f"{token}: an order {end} whose units were given back: {entry}"
                continue
            # (A failover may take back a decision no replica held, and no one was told: on a cluster, what
            # stays is what the answers below say.)
            first = self.ends.setdefault(token, end) if self.failovers is None else end
            assert end == first, f"{token} ended {first}, then {end}"
            assert (entry["state"] == "returned") == (end != "paid"), f"{token} ended {end}: {entry}"
            message = self.messages.get(entry.get("decided_msg", ""))
            assert message is None or message.state != "rolled_back", f"{token}'s decision was rolled back: {entry}"
        for token, answers in self.decided.items():
            for answer in answers:
                entry = state.ever.get(token, {})
                if answer.message_id is not None:
                    assert entry.get("decided_msg") == answer.message_id, f"{token} told {answer}, the log: {entry}"
                if answer.decision in ENDS:
                    assert entry.get("order") == ENDS[answer.decision], f"{token} told {answer}, the log: {entry}"

    def settle(self) -> None:
        """The end of the sale: stalled producers die, the checker settles every open message, and each
        deduction is then carried by exactly one committed message, as the consumer would apply it."""
        for _, _, tasks in self.stalls:
            for task in tasks:
                task.cancel()
        self.stalls = []
        for p in self.producers:
            self.loop.run_until_complete(p.close())
        if self.failovers:
            self.failovers.heal()
        self.checker._grace_ms = OLD_MS
        for message in list(self.messages.values()):
            for _ in range(20):
                if message.state != "half":
                    break
                verdict = self.checker.check(Delivery(message.gid, "deductions", None, message.body, 0, 1))
                if verdict is Resolution.COMMIT:
                    self.end(message.gid, "committed")
                elif verdict is Resolution.ROLLBACK:
                    self.end(message.gid, "rolled_back")
            assert message.state != "half", f"the checker never settled {message.gid}"
        state = books.read(self.raw, self.sku)
        # Every committed message, of this load or one before: a message sent before a reload may have run
        # its pre-deduct after it, on the new load's keys.
        committed = [
            Decoded(Delivery(m.gid, "deductions", None, m.body, m.born_ms, 1), m.decoded)
            for m in self.messages.values()
            if m.state == "committed"
        ]
        plan = accepted.plan(committed, self.sync.lookup(accepted.wanted(committed))) if committed else None
        applied: dict[str, set[int]] = {}
        for incoming in plan.apply if plan else []:
            applied.setdefault(incoming.deduction.token, set()).add(incoming.deduction.qty)
        # Never a conflict, not even for a message of a load a reload replaced (its deductions discarded on
        # both sides): the consumer skips it.
        assert plan is None or plan.conflicts == [], f"the consumer would file conflicts: {plan.conflicts}"
        deducted = {t: {int(e["qty"])} for t, e in state.ever.items()}
        assert applied == deducted, f"MySQL would get {applied}, Redis deducted {deducted}"
        for token, said in self.told.items():
            if any(s in ("accepted", "duplicate") for s, _ in said):
                assert token in applied, f"{token} was told {said} and would have no order"
        self._check_decisions_carried(state, committed)

    def _check_decisions_carried(self, state: books.State, committed: list[Decoded]) -> None:
        """Each order decided in the log is carried to MySQL by its decision's own message, committed."""
        decisions = [d for d in committed if d.message.source == SOURCE_DECISION]
        plan = accepted.plan(decisions, self.sync.lookup(accepted.wanted(decisions))) if decisions else None
        carried = {(i.deduction.token, i.order.state) for i in plan.apply if i.order} if plan else set()
        ended = {(t, e["order"]) for t, e in state.ever.items() if e.get("order") not in (None, "awaiting")}
        assert carried == ended, f"the decisions' messages would carry {carried}, the log ended {ended}"

    def teardown(self) -> None:
        try:
            if self.load:
                self.settle()
        finally:
            for p in self.producers:
                with contextlib.suppress(Exception):
                    self.loop.run_until_complete(p.close())
            self.loop.close()
            self.sync.close()
            self.raw.close()


def _books_hold(self: ProtocolMachine) -> None:
    ProtocolMachine.steps += 1
    if self.load:
        self.check_books()


# Hypothesis checks invariants after every step (and after the initial load).
ProtocolMachine.books_hold = invariant()(_books_hold)  # type: ignore[attr-defined]
