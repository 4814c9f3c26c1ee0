"""The lock files pin every dependency pyproject.toml names, so `make install` installs what was tested."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import ROOT


def _pinned(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    return {m[1].lower().replace("_", "-"): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_dependency_is_pinned_with_hashes_in_both_lock_files() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, dev = _names(project["dependencies"]), _names(project["optional-dependencies"]["dev"]) - {"flashsale"}
    lock, dev_lock = _pinned("requirements.lock"), _pinned("requirements-dev.lock")
    assert runtime <= set(lock), sorted(runtime - set(lock))
    assert runtime | dev <= set(dev_lock), sorted((runtime | dev) - set(dev_lock))
    # The transitive ones too: the gRPC stack under the RocketMQ client.
    assert {"grpcio", "protobuf"} <= set(lock)
    assert all(lock[name] == dev_lock[name] for name in lock), "the two locks disagree on a version"
    for name in ("requirements.lock", "requirements-dev.lock"):
        text = (ROOT / name).read_text()
        assert text.count("==") <= text.count("--hash=sha256:")


def test_the_pinned_rocketmq_client_is_the_one_its_internals_module_names() -> None:
    from flashsale.adapters.rocketmq import internals as rocketmq_internals

    assert _pinned("requirements.lock")["rocketmq-python-client"] == "5.1.2"
    assert "5.1.2" in (rocketmq_internals.__doc__ or "")
