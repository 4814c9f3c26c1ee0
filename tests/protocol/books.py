"""A SKU's Redis books read with plain commands: no code of the product's, the key layout written out again.

The oracle of the acceptance tests (tests/oracle.py) reads the same keys for the books' totals; the
machine needs more: each token's entry and where it is, and what each user holds.

A partitioned SKU keeps its layout and pool under {sku} and each partition's keys under {sku#n}. Units
on their way between the pool and a partition are in neither: a refill whose partition has not recorded
its id yet, a drain whose partition has and whose pool has not received it yet.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from flashsale.models import SOURCE_DECISION, DeductionMessage


@dataclass
class State:
    parts: dict[str, int] = field(default_factory=dict)  # shard -> units on sale there (both sub-domains)
    pool: int = 0
    moving: int = 0
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # token -> its deducted entry
    returned: dict[str, dict[str, Any]] = field(default_factory=dict)  # token -> its entry, units given back
    where: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # token -> shards
    by_user: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    negative: list[str] = field(default_factory=list)
    #: A partitioned SKU's per-user holds: (token, user) -> units held (user_hold.lua's h:token).
    holds: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def on_sale(self) -> int:
        return sum(self.parts.values()) + self.pool

    @property
    def deducted_qty(self) -> int:
        return sum(int(e["qty"]) for e in self.entries.values())

    @property
    def ever(self) -> dict[str, dict[str, Any]]:
        """Every token whose deduction happened: standing, or given back since (cancelled, expired)."""
        return {**self.entries, **self.returned}


def read(r: Any, sku: str) -> State:
    meta = r.hgetall(f"fs:{{{sku}}}:meta")
    shards = meta.get("parts", "").split() or [sku]
    state = State()
    received: dict[str, dict[str, str]] = {}
    for shard in shards:
        tag = "{" + shard + "}"
        active = int(r.get(f"fs:{tag}:stock") or 0)
        standby = int(r.hget(f"fs:{tag}:meta", "standby") or 0)
        state.parts[shard] = active + standby
        if active < 0 or standby < 0:
            state.negative.append(f"{shard}: active {active}, standby {standby}")
        received[shard] = r.hgetall(f"fs:{tag}:refills")
        for token, raw in r.hgetall(f"fs:{tag}:log").items():
            entry = json.loads(raw)
            if entry["state"] == "deducted":
                state.entries[token] = entry
                state.by_user[entry["user"]] += int(entry["qty"])
            elif entry["state"] == "returned":
                state.returned[token] = entry
            if entry["state"] in ("deducted", "returned"):
                state.where[token].append(shard)
    if shards != [sku]:
        state.pool = int(r.get(f"fs:{{{sku}}}:pool") or 0)
        if state.pool < 0:
            state.negative.append(f"pool {state.pool}")
        for transfer_id, raw in r.hgetall(f"fs:{{{sku}}}:transfers").items():
            transfer = json.loads(raw)
            if transfer.get("done"):
                continue
            done = received.get(transfer["part"], {}).get(transfer_id)
            if transfer["dir"] == "out" and done is None:
                state.moving += int(transfer["qty"])
            elif transfer["dir"] == "in" and done is not None:
                state.moving -= int(done)
        state.holds = _holds(r, sku, meta.get("loaded_ms", ""))
    return state


#: Shards of a partitioned SKU's holds, by the user id's crc32: fs:{#users:n}:sku:epoch (docs/scaling.md).
HOLD_SHARDS = 64


def _holds(r: Any, sku: str, epoch: str) -> dict[tuple[str, str], int]:
    pipe = r.pipeline(transaction=False)
    for n in range(HOLD_SHARDS):
        pipe.hgetall(f"fs:{{#users:{n}}}:{sku}:{epoch}")
    holds: dict[tuple[str, str], int] = {}
    for fields in pipe.execute():
        for name, raw in fields.items():
            if name.startswith("h:"):
                for user, units in json.loads(raw).items():
                    holds[(name[2:], user)] = int(units)
    return holds


def named_by(r: Any, message: DeductionMessage) -> list[str]:
    """The tokens of a message whose log entries record what that message did: a deduction (standing or
    given back since), or for a decision's message the decision on the order."""
    named = []
    for shard, purchases in message.shards().items():
        log = f"fs:{{{shard}}}:log"
        for p in purchases:
            raw = r.hget(log, p.token)
            entry = json.loads(raw) if raw else {}
            if message.source == SOURCE_DECISION:
                if entry.get("decided_msg") == message.gid:
                    named.append(p.token)
            elif entry.get("msg") == message.gid and entry["state"] in ("deducted", "returned"):
                named.append(p.token)
    return named
