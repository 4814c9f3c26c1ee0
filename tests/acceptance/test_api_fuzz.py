"""The live HTTP API fuzzed from its own OpenAPI document with schemathesis: bad input gets a 4xx with a
reason, never a 5xx, and every answer is one the document promises (status, content type, body).

A real producer serves SKUs loaded every way (orders awaiting payment, orders past their deadline, orders
final on acceptance, a partitioned SKU) with real purchases standing on them, so that the fuzzer gets
past the validation: its generated values are mixed with the SKUs, tokens and users that exist
(schemathesis dictionaries), and a payment is sent signed with the producer's secret over the exact
bytes sent, unless the case left its signature out or generated a wrong one.

Each operation goes through schemathesis's phases: examples, coverage (boundary values, each constraint
broken in turn, missing parameters, undeclared methods) and fuzzing, positive and negative, from a fixed
seed, derandomized and bounded, so that a run is reproducible. A failure prints the request that
reproduces it (a curl command). Each operation must have been called a minimum number of times, and each
that takes input must have answered 200 at least once, so the test cannot pass by testing nothing or by
bouncing off the validation.

schemathesis's pytest plugin loads a schema from a fixture through pytest internals this pytest no longer
has; the per-operation Hypothesis tests it builds (schemathesis.pytest.lazy.get_all_tests) run here inside
one plain test instead.
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.pytest.lazy import get_all_tests

from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.payments import SIGNATURE_HEADER, sign
from tests.acceptance.harness import Pipeline, post

SEED = 20261124
#: Hypothesis examples per operation in the fuzzing phase, both modes together (coverage adds its own).
EXAMPLES = 300
#: Calls each operation must have had, all phases together (one without input has few to make).
MIN_CALLS = {"with input": EXAMPLES, "without": 5}
SECRET = "api-fuzz-payments-secret"
BUYERS = 4
#: How often a generated SKU, token, user or signing time is replaced by one that exists.
REAL = 0.5


@dataclass
class Live:
    """The producer under test and what stands on it."""

    url: str
    skus: list[str]
    tokens: list[str]
    users: list[str]


@pytest.fixture(scope="module")
def live(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A producer with SKUs loaded every way and real purchases standing on each (one for the module)."""
    sku = f"api-{uuid.uuid4().hex[:10]}"
    deadlines = {f"{sku}-awaiting": 600_000, f"{sku}-lapsed": 1, f"{sku}-final": 0}
    for name, pay_within_ms in deadlines.items():
        set_stock(settings, name, 1_000, pay_within_ms=pay_within_ms)
    skus = [*deadlines, f"{sku}-parted"]
    set_stock(settings, skus[-1], 1_000, partitions=2)
    pipeline = Pipeline(settings, tmp_path_factory.mktemp("api-fuzz"))
    try:
        pipeline.launch("checker")
        pipeline.launch("consumer")
        _, url = pipeline.producer(FLASHSALE_PAYMENT_SECRET=SECRET)
        users, tokens = [f"u{i}" for i in range(BUYERS)], [f"t{i}" for i in range(BUYERS)]
        for name in skus:
            for user, token in zip(users, tokens, strict=True):
                status, answer = post(url, {"sku": name, "user_id": user, "qty": 1, "token": token})
                assert (status, answer["status"]) == (200, "accepted"), (name, status, answer)
        yield Live(url, skus, tokens, users)
    finally:
        pipeline.stop()  # fails the module if a process logged a traceback or died


def _config(live: Live) -> schemathesis.Config:
    """Seeded and derandomized; generated values mixed with the ones that exist."""
    now_ms = int(time.time() * 1000)  # a signing time the producer takes for the whole run (max age: 300 s)
    # A partition's name besides: Redis knows it, but it is no SKU.
    dictionaries = {"skus": [*live.skus, f"{live.skus[-1]}#0"], "tokens": live.tokens, "users": live.users}
    bindings = {"path.sku": "skus", "query.sku": "skus", "body.sku": "skus", "path.token": "tokens"}
    bindings |= {"body.token": "tokens", "body.user_id": "users", "body.ts_ms": "now"}
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # Generation timed on a shared 2-core box says nothing of the API: only that check is off.
            "suppress-health-check": ["too_slow"],
            "base-url": live.url,
            "dictionaries": {name: {"values": values} for name, values in {**dictionaries, "now": [now_ms]}.items()},
            "parameters": {key: {"dictionary": name, "probability": REAL} for key, name in bindings.items()},
            "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            # A failure prints its request whole, tokens included: nothing here is secret.
            "output": {"sanitization": {"enabled": False}},
        }
    )


def reason_given(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A 4xx says what was wrong and what to do: a JSON object with a non-empty `error` (a purchase's
    answer: `message`)."""
    if not 400 <= response.status_code < 500:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} without a JSON body: {response.content[:200]!r}") from None
    reason = (body.get("error") or body.get("message")) if isinstance(body, dict) else None
    assert isinstance(reason, str) and reason.strip(), f"{response.status_code} without a reason: {body!r}"


def _signed(case: schemathesis.Case) -> dict[str, Any]:
    """Transport arguments sending a payment signed with the producer's secret over the exact bytes sent,
    unless the case left its signature header out or generated it as an invalid one (a 401 then)."""
    if case.operation.path != "/orders/{token}/pay" or SIGNATURE_HEADER not in (case.headers or {}):
        return {}
    meta = case.meta
    header = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    if header is not None and header.mode is GenerationMode.NEGATIVE:
        return {}
    sent = case.as_transport_kwargs()
    body = requests.Request("POST", sent["url"], json=sent.get("json"), data=sent.get("data")).prepare().body
    raw = body.encode() if isinstance(body, str) else body or b""
    case.headers[SIGNATURE_HEADER] = sign(SECRET, raw)
    return {"data": raw}


def _reported(exc: BaseException) -> list[str]:
    """Each failure in what a Hypothesis test raised, with the request that reproduces it."""
    if isinstance(exc, FailureGroup):
        return [exc.message, *getattr(exc, "__notes__", [])]
    if isinstance(exc, BaseExceptionGroup):
        return [line for sub in exc.exceptions for line in _reported(sub)]
    return ["".join(traceback.format_exception(exc))]


def test_bad_input_gets_a_4xx_with_a_reason_and_every_answer_is_documented(live: Live) -> None:
    # Loaded from the document as served, but not by its URL: schemathesis leaves out the operation it
    # was loaded from, and GET /openapi.json is one of the routes to fuzz.
    document = requests.get(live.url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document, config=_config(live))
    calls: Counter[str] = Counter()
    statuses: defaultdict[str, set[int]] = defaultdict(set)

    def exchange(case: schemathesis.Case) -> None:
        response = case.call(**_signed(case))
        calls[case.operation.label] += 1
        statuses[case.operation.label].add(response.status_code)
        case.validate_response(response, additional_checks=[reason_given])

    found: dict[str, list[str]] = {}
    takes_input: dict[str, bool] = {}
    started = time.monotonic()
    for built in get_all_tests(schema=schema, test_func=exchange, settings=None, given_kwargs=None):
        operation, test = built.ok()
        takes_input[operation.label] = bool(operation.path_parameters or operation.query or operation.body)
        try:
            test()
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis's FailureGroup is no Exception
            found[operation.label] = _reported(exc)  # and every operation runs: one run reports every defect
    print(f"{sum(calls.values())} requests in {time.monotonic() - started:.1f} s: {dict(calls)}")
    assert not found, "\n\n".join(f"=== {label}\n" + "\n".join(lines) for label, lines in found.items())
    assert sorted(takes_input) == sorted(f"{m.upper()} {p}" for p, item in document["paths"].items() for m in item)
    short = {op: n for op, n in calls.items() if n < MIN_CALLS["with input" if takes_input[op] else "without"]}
    assert not short and len(calls) == len(takes_input), (calls, takes_input)
    gone = [sku for sku in live.skus if requests.get(f"{live.url}/stock/{sku}", timeout=10).status_code != 200]
    assert not gone, f"{gone} were unloaded under the test: did another session empty the tests' Redis database?"
    never_ok = {op: sorted(statuses[op]) for op in takes_input if takes_input[op] and 200 not in statuses[op]}
    assert not never_ok, f"operations that never answered 200, with the statuses they did answer: {never_ok}"


def test_a_path_is_read_as_the_server_decoded_it_once(live: Live) -> None:
    # The producer gets the path percent-decoded: t%2530 asks for the token "t%30", a malformed one, which
    # decoding again would read as t0; sku%230 asks for "sku#0", a partition's name, which is no SKU.
    awaiting, parted = live.skus[0], live.skus[-1]
    token = requests.get(f"{live.url}/orders/t%2530?sku={awaiting}", timeout=10)
    assert token.status_code == 422 and set(token.json()) == {"error"} and "'t%30'" in token.json()["error"]
    partition = requests.get(f"{live.url}/stock/{parted}%230", timeout=10)
    assert partition.status_code == 422 and partition.json()["error"].startswith("sku must be")
    assert requests.get(f"{live.url}/orders/t%30?sku={awaiting}", timeout=10).json()["token"] == "t0"
