"""Run a command against a throwaway PostgreSQL server, then remove the server.

    python scripts/with_postgres.py -- pytest -q -m postgres

Starts PostgreSQL from the Debian package ``postgresql`` (installed with apt-get
when it is missing and this runs as root) in a temporary folder, on a free
local port, as an unprivileged user (``initdb`` refuses to run as root: as root
the server runs as ``nobody``). The command runs with DAGSTER_PG_HOST,
DAGSTER_PG_PORT, DAGSTER_PG_USER, DAGSTER_PG_PASSWORD, DAGSTER_PG_DB (what
deploy/dagster-postgres.yaml reads), CFR_REGISTRY_URL (the bank registry) and
CFR_TEST_PG_URL set. The server is stopped by its PID and its folder deleted,
whatever the command did; the script exits with the command's exit code.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DB, USER, PASSWORD = "cfr", "cfr", "cfr"


def _bin_dir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    if which:
        return Path(which).resolve().parent
    if os.geteuid() != 0:
        sys.exit(
            "PostgreSQL is not installed and this is not root: install the Debian package "
            "`postgresql` (sudo apt-get install postgresql), then rerun"
        )
    print("installing the Debian package postgresql ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env)
    return _bin_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    if not argv:
        sys.exit(__doc__)
    bindir = _bin_dir()
    as_root = os.geteuid() == 0
    user = {"user": "nobody", "group": "nogroup"} if as_root else {}
    folder = Path(tempfile.mkdtemp(prefix="cfr-pg-"))
    server = None
    try:
        if as_root:
            shutil.chown(folder, "nobody", "nogroup")
        data = folder / "data"
        pwfile = folder / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if as_root:
            shutil.chown(pwfile, "nobody", "nogroup")
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(pwfile)]
            + ["--auth=md5", "-E", "UTF8", "--no-locale"],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=folder,
            **user,
        )
        port = _free_port()
        server = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder)]
            + ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"],
            stdout=open(folder / "server.log", "w"),
            stderr=subprocess.STDOUT,
            cwd=folder,
            **user,
        )
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        deadline = time.time() + 60
        while subprocess.run(
            [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        ).returncode:
            if server.poll() is not None or time.time() > deadline:
                sys.exit("PostgreSQL did not start:\n" + (folder / "server.log").read_text())
            time.sleep(0.3)
        subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DB],
            check=True,
            env=env,
        )
        url = f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{port}/{DB}"
        env.update(
            DAGSTER_PG_HOST="127.0.0.1",
            DAGSTER_PG_PORT=str(port),
            DAGSTER_PG_USER=USER,
            DAGSTER_PG_PASSWORD=PASSWORD,
            DAGSTER_PG_DB=DB,
            CFR_REGISTRY_URL=url,
            CFR_TEST_PG_URL=url,
        )
        print(f"throwaway PostgreSQL (pid {server.pid}) on 127.0.0.1:{port}", flush=True)
        return subprocess.run(argv, env=env).returncode
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
