"""A run launcher whose run workers Dagster's run monitoring can see die.

Dagster's ``DefaultRunLauncher`` starts each run in a local worker process but
offers no health check, so with run monitoring on, a worker killed by the OOM
killer or ``kill -9`` leaves its run STARTED for ever, and the queue's
one-run-per-category limit then never lets another run of that category start.
``MonitoredRunLauncher`` is the same launcher plus that health check: it reads
the worker's pid from the run's "Started process for run (pid: N)" event (or,
for runs executed in process by `cfr pipeline run` and `cfr demo`, from their
``cfr/worker_pid`` tag) and, on the host that started it, reports the run
failed once the process is gone.
dagster_home/dagster.yaml turns it and run monitoring on.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from dagster import DagsterEventType, DefaultRunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun

HOST_TAG = "cfr/launcher_host"
PID_TAG = (
    "cfr/worker_pid"  # runs executed in process (`cfr pipeline run`, `cfr demo`) name their pid
)
_PID = re.compile(r"Started process for run \(pid: (\d+)\)")


def worker_pid(instance, run_id: str) -> int | None:
    """The pid of the run's worker process, from its engine events (None: not started yet)."""
    pid = None
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        match = _PID.search(entry.dagster_event.message or "")
        if match:
            pid = int(match.group(1))
    return pid


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process on this host."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MonitoredRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` plus a worker health check for Dagster's run monitoring."""

    def launch_run(self, context: LaunchRunContext) -> None:
        self._instance.add_run_tags(context.dagster_run.run_id, {HOST_TAG: socket.gethostname()})
        super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        host = run.tags.get(HOST_TAG)
        if host and host != socket.gethostname():
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"worker runs on {host}")
        pid = worker_pid(self._instance, run.run_id)
        if pid is None and run.tags.get(PID_TAG, "").isdigit():
            pid = int(run.tags[PID_TAG])
        if pid is None:  # not started yet: run monitoring's start timeout covers this case
            return CheckRunHealthResult(WorkerStatus.RUNNING, "worker not started yet")
        if process_alive(pid):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"the run worker (pid {pid}) is gone: killed or crashed"
        )
