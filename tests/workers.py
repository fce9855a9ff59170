"""Real Celery worker processes for integration tests (no eager mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

BASE_DIR = Path(__file__).resolve().parent.parent


def database_url_for(settings_dict: dict[str, Any]) -> str:
    """A URL for the database this test process uses (pytest-django's test_ copy)."""
    host = quote(settings_dict["HOST"] or "", safe="")
    port = settings_dict.get("PORT") or 5432
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    return f"postgresql://{settings_dict['USER']}{password}@{host}:{port}/{settings_dict['NAME']}"


class CeleryWorker:
    """One `celery worker` process (its own process group, so SIGKILL takes its children too)."""

    def __init__(
        self,
        env: dict[str, str],
        queues: str = "high,default,batch",
        concurrency: int = 1,
        with_beat: bool = False,
        pool: str = "prefork",
        command_prefix: tuple[str, ...] = (),
        node_name: str = "",
        log: Path | None = None,
    ) -> None:
        self.env = env
        # e.g. ("ip", "netns", "exec", "<namespace>"): a worker on another (simulated) host.
        self.command_prefix = command_prefix
        self.node_name = node_name or f"test-{os.getpid()}-{time.monotonic_ns()}@%h"
        self.queues = queues
        self.concurrency = concurrency
        self.pool = pool
        self.with_beat = with_beat
        self.process: subprocess.Popen | None = None
        self.log = log or Path(tempfile.mkstemp(prefix="celery-worker-", suffix=".log")[1])

    def start(self, timeout: float = 60) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (several then boot side by side)."""
        command = [
            *self.command_prefix,
            sys.executable,
            "-m",
            "celery",
            "-A",
            "memoryproject",
            "worker",
            "-Q",
            self.queues,
            "--concurrency",
            str(self.concurrency),
            "--pool",
            self.pool,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            self.node_name,
            "--loglevel",
            "INFO",
        ]
        if self.with_beat:  # beat inside the worker: the sweeper runs on its schedule
            command += ["--beat", "--schedule", str(self.log.with_suffix(".beat"))]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=BASE_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.process is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while " ready." not in self.output():
            if self.process.poll() is not None:
                raise RuntimeError(f"celery worker exited early:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"celery worker not ready in {timeout}s:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): a crash, not a shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the main process alone, as `make run`, docker and systemd send it: Celery's
        warm shutdown. (SIGTERM to the whole group would end the pool children at once, cutting
        their jobs short.) Whatever is left after `timeout` is killed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"the worker did not end within {timeout}s of SIGTERM:\n{self.output()[-6000:]}"
                ) from None
