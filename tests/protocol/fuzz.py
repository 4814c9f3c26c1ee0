"""`make fuzz`: the protocol's state machines (tests/protocol/machine.py) for a time budget, from a seed.

    python -m tests.protocol.fuzz --seed 7 --minutes 30

Rounds alternate between the stack's Redis (one node, the tests' database) and the tests' Redis Cluster
with failovers, each round from its own seed (the run's seed plus the round). The first finding stops
the run: Hypothesis prints the shrunk steps, and the command exits 1, with the seed that replays it.
Otherwise it prints how many examples and steps ran, and exits 0. Run it before a release.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import core, settings
from hypothesis.errors import FlakyStrategyDefinition
from hypothesis.stateful import run_state_machine_as_test

from flashsale.adapters.redis import stock as redis_stock
from flashsale.adapters.redis import topology as redis_topology
from flashsale.config import Settings
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.conftest import CLUSTER_ENV, ROOT, TEST_REDIS_DB, clean_environment
from tests.protocol import machine
from tests.protocol.test_protocol import on_cluster, run_settings, single

#: Examples per round: a round is one Hypothesis run, which shrinks what it finds before the next begins.
ROUND_EXAMPLES = 50


@contextmanager
def test_cluster() -> Iterator[StackSettings]:
    """The tests' Redis Cluster (as the `redis_cluster` fixture makes it), stopped after the run."""
    home = ROOT / ".flashsale" / "test-cluster"
    cluster = StackSettings.from_env({**clean_environment(), **CLUSTER_ENV, "FLASHSALE_HOME": str(home)})
    stack = Stack(cluster)
    stack.up(["redis"])
    try:
        yield cluster
    finally:
        stack.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (0: a random one, printed)")
    parser.add_argument("--minutes", type=float, default=30.0, help="time budget")
    parser.add_argument("--steps", type=int, default=50, help="most steps of one example")
    args = parser.parse_args(argv)
    run_seed = args.seed or random.randrange(1, 2**31)
    logging.disable(logging.CRITICAL)  # the product's warnings are expected here: the machine injects faults
    stack = Settings.from_env(clean_environment())
    node_url = stack.redis_url.rsplit("/", 1)[0] + f"/{TEST_REDIS_DB}"
    # The clients read a cluster's map again only when a reply says it moved: a run depends on its steps.
    redis_topology.MAP_TTL_S = redis_stock.MAP_TTL_S = 1e9
    deadline = time.monotonic() + args.minutes * 60
    print(f"fuzzing the protocol for {args.minutes:g} min from seed {run_seed}", flush=True)
    with test_cluster() as cluster:
        machines = [("one node", single(node_url)), ("cluster", on_cluster(cluster))]
        rounds = unreplayable = 0
        while time.monotonic() < deadline:
            name, machine_class = machines[rounds % 2]
            round_seed = run_seed + rounds
            started = time.monotonic()
            core.global_force_seed = round_seed  # what `pytest --hypothesis-seed` sets
            try:
                run_state_machine_as_test(
                    machine_class, settings=settings(run_settings(ROUND_EXAMPLES, args.steps), database=None)
                )
            except FlakyStrategyDefinition:
                # Not a finding: no invariant broke (a failure that does not replay is FlakyFailure, and
                # stops the run below). A step went another way on a second run of the same choices (a
                # WAIT cut short by a busy machine), so Hypothesis cannot go on with this round's tree.
                unreplayable += 1
                print(
                    f"round {rounds + 1} ({name}, seed {round_seed}): steps that did not replay; next round", flush=True
                )
            except BaseException:
                print(f"FOUND on {name}, round seed {round_seed} (run seed {run_seed}, round {rounds})", flush=True)
                raise
            rounds += 1
            print(
                f"round {rounds} ({name}, seed {round_seed}): {time.monotonic() - started:.0f} s; "
                f"{machine.ProtocolMachine.examples} examples, {machine.ProtocolMachine.steps} steps so far",
                flush=True,
            )
    print(
        f"no finding in {rounds} rounds ({unreplayable} cut short by steps that did not replay): "
        f"{machine.ProtocolMachine.examples} examples, {machine.ProtocolMachine.steps} steps, from seed {run_seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
