"""Install what the local stack needs and is missing: Debian packages and the RocketMQ jars."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from flashsale.errors import StackError
from flashsale.stack.layout import ROCKETMQ_VERSION, infra_file, jar_cache

logger = logging.getLogger(__name__)

#: The program each service needs -> the Debian package that provides it.
PROGRAMS = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mariadb": "mariadb-client",
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
}
#: Debian's way to keep package scripts from starting the system's own Redis and MariaDB on our ports.
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def which(program: str) -> str | None:
    # mariadbd lives in /usr/sbin, which a non-root PATH may lack.
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")


def program(name: str) -> str:
    path = which(name)
    if path is None:
        raise StackError(
            f"{name} is not installed", hint=f"run `flashsale stack up` as root or apt-get install {PROGRAMS[name]}"
        )
    return path


def missing_packages() -> list[str]:
    return sorted({pkg for prog, pkg in PROGRAMS.items() if which(prog) is None})


def ensure_packages() -> list[str]:
    """apt-get install whatever is missing; returns the packages installed."""
    packages = missing_packages()
    if not packages:
        return []
    if os.geteuid() != 0:
        raise StackError(
            f"missing packages: {', '.join(packages)}",
            hint=f"install them (sudo apt-get install -y {' '.join(packages)}) or run `flashsale stack up` as root",
        )
    if which("apt-get") is None:
        raise StackError(f"missing packages {', '.join(packages)} and no apt-get to install them")
    logger.info("installing %s with apt-get", " ".join(packages))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    added_policy = False
    if not _POLICY_RC_D.exists():
        _POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        _POLICY_RC_D.chmod(0o755)
        added_policy = True
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            _run(["apt-get", "update", "-q"], env, "apt-get update")
            _run(install, env, "apt-get install")
    finally:
        if added_policy:
            _POLICY_RC_D.unlink(missing_ok=True)
    still = missing_packages()
    if still:
        raise StackError(f"apt-get finished but {', '.join(still)} are still missing")
    return packages


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise StackError(f"{what} failed (exit {result.returncode}):\n{tail}")


def rocketmq_lib() -> Path:
    """The folder of RocketMQ jars, resolved once by Maven from infra/rocketmq/pom.xml and then reused."""
    pom = infra_file("rocketmq/pom.xml")
    cache = jar_cache()
    lib = cache / "lib"
    stamp = cache / "resolved.sha256"
    digest = hashlib.sha256(pom.read_bytes() + ROCKETMQ_VERSION.encode()).hexdigest()
    if lib.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
        return lib
    mvn = program("mvn")
    logger.info("resolving RocketMQ %s jars with Maven into %s", ROCKETMQ_VERSION, lib)
    partial = cache / "lib.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(pom),
        f"-Drocketmq.version={ROCKETMQ_VERSION}",
        "dependency:copy-dependencies",
        f"-DoutputDirectory={partial}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not any(partial.glob("rocketmq-proxy-*.jar")):
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise StackError(f"Maven could not resolve the RocketMQ jars (exit {result.returncode}):\n{tail}")
    shutil.rmtree(lib, ignore_errors=True)
    partial.rename(lib)
    stamp.write_text(digest)
    return lib
