"""Prometheus metrics of the three processes (served on /metrics)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from flashsale import __version__
from flashsale.models import PurchaseResult, PurchaseStatus, Resolution
from flashsale.records import ApplyReport

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: A bucket's `le` label, written as prometheus_client writes it.
_LE: Callable[[float], str] = floatToGoString


class PurchaseTally(Collector):
    """Purchases answered, by status, and the time each took: plain numbers the purchase path adds to,
    read at each scrape as the series `flashsale_purchases_total` and `flashsale_purchase_seconds`.

    prometheus_client's Counter and Histogram take a lock on every call: 1.2 µs a purchase, a tenth of
    the Python of a sold-out answer. One event loop is their only writer, so plain numbers do; a scrape
    from another thread reads counts at most one purchase behind.
    """

    def __init__(self) -> None:
        self._by_status = dict.fromkeys(PurchaseStatus, 0)
        self._buckets = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last: slower than every bound
        self._sum = 0.0

    def add(self, status: PurchaseStatus, seconds: float) -> None:
        self._by_status[status] += 1
        self._buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # a bucket counts values <= its bound
        self._sum += seconds

    def count(self, status: PurchaseStatus) -> None:
        """An answer counted and not timed."""
        self._by_status[status] += 1

    def collect(self) -> Iterator[Metric]:
        counter = CounterMetricFamily("flashsale_purchases", "Purchases answered, by status", labels=["status"])
        for status, n in list(self._by_status.items()):
            counter.add_metric([status.value], n)
        yield counter
        cumulative = list(accumulate(self._buckets))
        bounds = [_LE(b) for b in _LATENCY_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "flashsale_purchase_seconds",
            "Time to answer a purchase",
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=self._sum,
        )


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The standard process (CPU, memory, file descriptors), platform and garbage-collector series.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        Gauge("flashsale_build_info", "The running flashsale's version", ["version"], registry=r).labels(
            __version__
        ).set(1)
        self.resyncs = Counter(
            "flashsale_broker_resyncs",
            "Times a RocketMQ client re-sent its settings after the broker forgot it (a proxy restart)",
            registry=r,
        )
        self.purchases = PurchaseTally()
        r.register(self.purchases)
        self.in_flight = Gauge("flashsale_purchases_in_flight", "Purchases being processed", registry=r)
        self.group_sizes = Histogram(
            "flashsale_transaction_purchases",
            "Purchases one transaction (one half message and one pre-deduct) carried",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.checks = Counter(
            "flashsale_checks", "Transaction checks answered, by resolution", ["resolution"], registry=r
        )
        self.check_seconds = Histogram(
            "flashsale_check_seconds", "Time to answer a transaction check", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.messages = Counter(
            "flashsale_consumer_messages", "Messages handled by the consumer, by outcome", ["outcome"], registry=r
        )
        self.batches = Counter("flashsale_consumer_batches", "Batches committed by the consumer", registry=r)
        self.batch_seconds = Histogram(
            "flashsale_consumer_batch_seconds", "Time to apply and ack one batch", buckets=_LATENCY_BUCKETS, registry=r
        )

    def purchase(self, result: PurchaseResult, seconds: float) -> None:
        self.purchases.add(result.status, seconds)

    def invalid(self) -> None:
        """A request refused before it was a purchase (malformed JSON or fields): counted, not timed."""
        self.purchases.count(PurchaseStatus.INVALID)

    def group(self, size: int) -> None:
        self.group_sizes.observe(size)

    def check(self, resolution: Resolution, seconds: float) -> None:
        self.checks.labels(resolution.value).inc()
        self.check_seconds.observe(seconds)

    def batch(self, report: ApplyReport, size: int, seconds: float) -> None:
        self.batches.inc()
        self.batch_seconds.observe(seconds)
        self.messages.labels("applied").inc(len(report.applied))
        self.messages.labels("duplicate").inc(report.duplicates)
        self.messages.labels("skipped").inc(report.skipped)
        self.messages.labels("conflict").inc(len(report.conflicts))
        self.messages.labels("dead_letter").inc(len(report.dead_letters))
