"""The reconcile report stays readable at a thousand SKUs on an 80-column terminal."""

from __future__ import annotations

import io

from rich.console import Console

from flashsale.cli.ops_cmd import PROBLEMS_SHOWN, print_reconcile
from flashsale.ops.reconcile import SkuReport


def _report(i: int, drift: bool = False) -> SkuReport:
    report = SkuReport(
        sku=f"sku-{i:04d}-a-rather-long-product-name-{i}",
        initial=10_000,
        redis_stock=9_000,
        mysql_stock=9_000,
        redis_deducted=1_000,
        mysql_applied=1_000,
        orders=1_000,
    )
    if drift:
        report.problems.append("1 deduction(s) (1 units) in Redis are missing in MySQL")
        report.missing_tokens.append(f"t-{i}")
    return report


def _render(reports: list[SkuReport], **options: bool) -> list[str]:
    out = io.StringIO()
    print_reconcile(reports, Console(file=out, width=80, color_system=None), **options)
    return out.getvalue().splitlines()


def _rows(lines: list[str]) -> list[str]:
    return [line for line in lines if line.rstrip().endswith((" ok", " DRIFT"))]


def _text(lines: list[str]) -> str:
    """The output as one line, as a reader follows wrapped text."""
    return " ".join(" ".join(lines).split())


def test_a_thousand_skus_give_one_row_each_within_80_columns_and_a_summary() -> None:
    reports = [_report(i, drift=i % 100 == 7) for i in range(1000)]
    lines = _render(reports)
    assert max(len(line) for line in lines) <= 80
    rows = _rows(lines)
    assert len(rows) == 1000
    assert sum("DRIFT" in row for row in rows) == 10
    assert "1,000 SKU(s): 990 consistent, 10 with drift; 1,000,000 sold, 0 in flight" in lines
    assert rows[0].split()[1:] == ["9,000", "9,000", "1,000", "1,000", "1,000", "0", "ok"]


def test_only_drift_lists_the_drifting_skus_and_still_counts_them_all() -> None:
    reports = [_report(i, drift=i in (3, 500)) for i in range(1000)]
    lines = _render(reports, only_drift=True)
    rows = _rows(lines)
    assert len(rows) == 2 and all(row.rstrip().endswith("DRIFT") for row in rows)
    assert "1,000 SKU(s): 998 consistent, 2 with drift; 1,000,000 sold, 0 in flight" in lines
    assert "sku-0003-a-rather-long-product-name-3: 1 deduction(s) (1 units) in Redis are missing in MySQL" in _text(
        lines
    )


def test_problems_are_spelled_out_for_the_first_drifting_skus_and_counted_for_the_rest() -> None:
    reports = [_report(i, drift=True) for i in range(PROBLEMS_SHOWN + 5)]
    lines = _render(reports, only_drift=True)
    assert _text(lines).count("in Redis are missing in MySQL") == PROBLEMS_SHOWN
    assert "... and 5 more SKU(s) with drift: `--json` lists them all" in lines
