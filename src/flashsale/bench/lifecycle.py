"""What the order lifecycle did in a bench sale, read from the SKUs' Redis logs once every order is decided.

Every time here is on Redis's clock, as the log entries carry it (decide.lua and prededuct.lua read
Redis TIME): `ts` when a unit was bought, `due` the order's payment deadline, `decided_ts` when it was
paid or expired. The bench buys one unit per purchase, on SKUs of one key, so units are counted as orders.

- Expiry lateness of an order: decided_ts - due, for the orders expired whose deadline fell while the
  buyers were still buying (under load); the ones due after the last answer are counted apart.
- A unit given back is sold again when a later purchase needs it: a SKU loaded with S units that took
  P purchases sold P - S units a second time, and the k-th of those purchases (in `ts` order) is the
  sale of the k-th unit given back (in `decided_ts` order). That match is exact in time, not a guess:
  before its (S+k)-th purchase the SKU's stock was S - (S+k-1) + returned >= 1, so at least k units had
  come back by then. From deadline to resold, for a unit: the `ts` of the purchase that sold it again
  minus the `due` of the order that gave it back (lateness, then the time it waited on sale for a buyer).
- Units resold per second: the units sold again over the seconds from the first unit given back to
  the last unit resold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flashsale import constants as c
from flashsale.bench.load import percentile
from flashsale.records import LogEntry


@dataclass
class Lifecycle:
    """The numbers of one sale with orders awaiting payment (see the module docstring)."""

    orders: int = 0  # purchases the sale took, the units sold again included
    paid: int = 0
    expired: int = 0
    awaiting: int = 0  # still undecided when read (0 once the bench has waited for every deadline)
    resold: int = 0
    resold_per_s: float = 0.0
    back_unsold: int = 0  # given back, then on sale until the end with no buyer
    expired_under_load: int = 0  # of `expired`: due before the last answer, the lateness counted below
    oversold: int = 0  # units sold beyond those loaded and given back (per SKU, summed)
    lost: int = 0  # filled in by the bench: purchases told accepted that MySQL does not hold
    lateness_p50_ms: float = 0.0
    lateness_p99_ms: float = 0.0
    lateness_max_ms: float = 0.0
    resold_after_due_p50_ms: float = 0.0
    resold_after_due_p99_ms: float = 0.0
    #: Filled in by the bench: the buyers' side and the comparison with the sale without orders.
    unpaid_buyers: int = 0
    payments: dict[str, int] = field(default_factory=dict)
    pay_p50_ms: float = 0.0
    pay_p99_ms: float = 0.0
    settle_s: float = 0.0  # from the last answer until every order was decided and MySQL held it
    cpu_x_plain: float | None = None  # CPU per accepted purchase, all processes, over the plain sale's
    cpu_extra_ms_per_accepted: float | None = None  # (its CPU - the plain sale's) / its accepted purchases


@dataclass
class _Samples:
    lateness_ms: list[float] = field(default_factory=list)
    after_due_ms: list[float] = field(default_factory=list)
    first_back_ms: int | None = None
    last_resale_ms: int | None = None


def measure(skus: Iterable[tuple[Iterable[LogEntry], int]], *, sale_end_ms: int) -> Lifecycle:
    """The lifecycle numbers of a sale: each SKU given as its log entries and the units it was loaded with;
    `sale_end_ms` is when the buyers stopped, on Redis's clock."""
    result, samples = Lifecycle(), _Samples()
    for entries, loaded in skus:
        _add_sku(result, samples, entries, loaded, sale_end_ms)
    if samples.first_back_ms is not None and samples.last_resale_ms is not None and result.resold:
        span_s = max(0.001, (samples.last_resale_ms - samples.first_back_ms) / 1000)
        # Two decimals: a few units a second rounded to 0.1 lost 1% of the figure (4.34 printed 4.3).
        result.resold_per_s = round(result.resold / span_s, 2)
    lateness, after_due = samples.lateness_ms, samples.after_due_ms
    result.expired_under_load = len(lateness)
    result.lateness_p50_ms, result.lateness_p99_ms = percentile(lateness, 0.5), percentile(lateness, 0.99)
    result.lateness_max_ms = max(lateness, default=0.0)
    result.resold_after_due_p50_ms = percentile(after_due, 0.5)
    result.resold_after_due_p99_ms = percentile(after_due, 0.99)
    return result


def _add_sku(result: Lifecycle, samples: _Samples, entries: Iterable[LogEntry], loaded: int, end_ms: int) -> None:
    bought: list[int] = []
    back: list[tuple[int, int]] = []  # (decided_ts, due) of each order whose unit came back
    for e in entries:
        if e.state not in c.DEDUCTED_STATES:
            continue  # fenced: never sold
        bought.append(e.ts_ms)
        if e.order == "paid":
            result.paid += 1
        elif e.order == "awaiting":
            result.awaiting += 1
        elif e.order == "expired" and e.decided_ms is not None and e.due_ms is not None:
            result.expired += 1
            if e.due_ms <= end_ms:
                samples.lateness_ms.append(e.decided_ms - e.due_ms)
        if e.state == c.STATE_RETURNED and e.decided_ms is not None and e.due_ms is not None:
            back.append((e.decided_ms, e.due_ms))
    bought.sort()
    back.sort()
    resales = bought[loaded:]
    samples.after_due_ms += [float(ts - due) for ts, (_, due) in zip(resales, back, strict=False)]
    result.orders += len(bought)
    result.resold += len(resales)
    result.back_unsold += max(0, len(back) - len(resales))
    result.oversold += max(0, len(resales) - len(back))
    if back:
        samples.first_back_ms = min(back[0][0], samples.first_back_ms or back[0][0])
    if resales:
        samples.last_resale_ms = max(resales[-1], samples.last_resale_ms or resales[-1])
