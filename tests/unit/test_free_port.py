"""Ports for child processes: free, and out of reach of the machine's outgoing connections."""

from __future__ import annotations

import socket

import pytest

from flashsale.bench import fleet
from flashsale.bench.fleet import PORT_RANGE, ephemeral_start, free_port


def test_a_port_for_a_child_is_free_and_below_the_range_outgoing_connections_take_theirs_from() -> None:
    # A port from the ephemeral range can be taken by any connection made before the child binds it.
    ports = [free_port() for _ in range(50)]
    assert all(PORT_RANGE[0] <= p < min(PORT_RANGE[1], ephemeral_start()) for p in ports), ports
    assert len(set(ports)) > 40  # spread: two children asking at once rarely get the same one
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_something_listens_on_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        taken = listening.getsockname()[1]
        picks = iter([taken, taken, 23_456])
        monkeypatch.setattr(fleet, "PORT_RANGE", (1, 65_536))
        monkeypatch.setattr(fleet, "ephemeral_start", lambda: 65_536)
        monkeypatch.setattr(fleet._PICK, "randrange", lambda low, high: next(picks))
        assert free_port() == 23_456
