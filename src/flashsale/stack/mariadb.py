"""MariaDB of the local stack: one server, its data folder initialised once, the application's user made."""

from __future__ import annotations

import getpass
import os
import subprocess
from pathlib import Path

from flashsale.config import DEFAULT_DATABASE, DEFAULT_DB_PASSWORD, DEFAULT_DB_USER
from flashsale.errors import StackError
from flashsale.stack import install
from flashsale.stack.service import HOST, Service


class MariaDBService(Service):
    name = "mariadb"
    ready_timeout_s = 90.0
    stop_grace_s = 60.0

    @property
    def port(self) -> int:
        return self.settings.ports.mysql

    @property
    def socket(self) -> Path:
        return self.dir / "mariadb.sock"

    def prepare(self) -> None:
        datadir = self.dir / "data"
        if (datadir / "mysql").is_dir():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        user = getpass.getuser()
        result = subprocess.run(
            [
                install.program("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={datadir}",
                f"--user={user}",
                "--auth-root-authentication-method=socket",
                f"--auth-root-socket-user={user}",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise StackError(f"mariadb-install-db failed:\n{tail}")

    def command(self) -> list[str]:
        cmd = [
            install.program("mariadbd"),
            "--no-defaults",
            f"--datadir={self.dir / 'data'}",
            f"--socket={self.socket}",
            f"--pid-file={self.dir / 'mariadb.pid'}",
            f"--port={self.port}",
            f"--bind-address={HOST}",
            f"--log-error={self.log_file}",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--innodb-buffer-pool-size=256M",
            "--max-connections=500",
            # Every commit reaches the disk: acked deductions must survive a crash.
            "--innodb-flush-log-at-trx-commit=1",
            # No table-wide AUTO-INC lock for INSERT ... SELECT (the orders): two consumers never queue on it.
            "--innodb-autoinc-lock-mode=2",
        ]
        if os.geteuid() == 0:
            cmd.append("--user=root")
        return cmd

    def _root_sql(self, sql: str) -> str:
        result = subprocess.run(
            [install.program("mariadb"), "--no-defaults", f"--socket={self.socket}", "-u", "root", "-N", "-e", sql],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise StackError(f"mariadb refused the bootstrap SQL: {result.stderr.strip()}")
        return result.stdout

    def ping(self) -> bool:
        try:
            self._root_sql("SELECT 1")
        except (StackError, subprocess.TimeoutExpired):
            return False
        return True

    def after_start(self) -> None:
        user, password = DEFAULT_DB_USER, DEFAULT_DB_PASSWORD
        statements = [f"CREATE DATABASE IF NOT EXISTS `{self.settings.database}` CHARACTER SET utf8mb4"]
        for host in ("127.0.0.1", "localhost"):
            statements += [
                f"CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY '{password}'",
                # `flashsale%` also covers the test databases (flashsale_test_*).
                f"GRANT ALL PRIVILEGES ON `{DEFAULT_DATABASE}%`.* TO '{user}'@'{host}'",
            ]
        self._root_sql("; ".join(statements))

    def check(self) -> str:
        import pymysql

        try:
            conn = pymysql.connect(
                host=HOST, port=self.port, user=DEFAULT_DB_USER, password=DEFAULT_DB_PASSWORD, connect_timeout=2
            )
        except pymysql.MySQLError as exc:
            raise StackError(f"mariadb does not accept the application user: {exc}") from exc
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                row = cur.fetchone()
        finally:
            conn.close()
        return f"mariadb {row[0] if row else '?'}"
