"""The purchases' counts and latencies, as a scrape reads them (service/metrics.py)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flashsale.models import PurchaseResult, PurchaseStatus
from flashsale.service.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_scrape_reads_counts_by_status_and_cumulative_buckets_where_a_bound_holds_its_own_value() -> None:
    metrics = Metrics()
    for status, seconds in [
        (PurchaseStatus.ACCEPTED, 0.001),  # on a bound: counted in that bucket (le: less or equal)
        (PurchaseStatus.ACCEPTED, 0.0011),
        (PurchaseStatus.SOLD_OUT, 0.0),
        (PurchaseStatus.PENDING, 7.0),  # past every bound: +Inf only
    ]:
        metrics.purchase(PurchaseResult(status, "t"), seconds)
    metrics.invalid()  # counted, never timed: it was refused before it was a purchase
    samples = _samples(metrics)

    def count(status: str) -> float:
        return samples[("flashsale_purchases_total", (("status", status),))]

    def bucket(le: str) -> float:
        return samples[("flashsale_purchase_seconds_bucket", (("le", le),))]

    assert [count(s) for s in ("accepted", "sold_out", "pending", "invalid", "error")] == [2, 1, 1, 1, 0]
    assert [bucket(le) for le in ("0.001", "0.0025", "5.0", "+Inf")] == [2, 3, 3, 4]
    assert samples[("flashsale_purchase_seconds_count", ())] == 4
    assert abs(samples[("flashsale_purchase_seconds_sum", ())] - 7.0021) < 1e-9
