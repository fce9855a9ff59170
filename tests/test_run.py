"""`make run` (memoryproject.run) as a user meets it: every lane served, metrics summed, a clean
stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from memories import accounts
from tests.helpers import metric_value, wait_for
from tests.workers import BASE_DIR


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_make_run_serves_every_lane_sums_their_metrics_and_stops_cleanly(
    worker_env, end_user, tmp_path
) -> None:
    port = _free_port()
    log = tmp_path / "run.log"
    env = {**worker_env, "PORT": str(port), "MEMORY_VAR_DIR": str(tmp_path / "var")}
    with open(log, "w") as output:
        service = subprocess.Popen(
            [sys.executable, "-m", "memoryproject.run"],
            cwd=BASE_DIR,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert service.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=60, what="the service to answer /healthz")
        assert f"http://127.0.0.1:{port}/" in log.read_text()  # it says where to reach it
        _, key = accounts.api_key_create(tenant=end_user.tenant)
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"})
        uid = str(end_user.id)
        # The high job is another user's: one user's jobs run in order, so the high lane's
        # message could run the same user's earlier job instead.
        other = str(accounts.end_user_create(tenant=end_user.tenant).id)
        submitted = [
            client.post(
                "/v1/memories",
                json={"user_id": user, "messages": [{"role": "user", "content": text}], **extra},
            ).json()["request_id"]
            for user, text, extra in [
                (uid, "I like tea.", {}),
                (other, "I live in Oslo.", {"priority": "high"}),
            ]
        ]
        batch = client.post(
            "/v1/memories/batch",
            json={"items": [{"user_id": uid, "content": "Likes jam"}], "async": True},
        )
        submitted.append(batch.json()["request_id"])

        def finished() -> bool:
            states = [client.get(f"/v1/requests/{rid}").json()["status"] for rid in submitted]
            return states == ["success"] * 3

        wait_for(finished, timeout=60, what="a job on each lane to succeed")

        def counted() -> list[float | None]:
            exposition = client.get("/metrics").text
            return [
                metric_value(exposition, "memory_jobs_total", lane=lane, outcome="done")
                for lane in ("default", "high", "batch")
            ]

        # A worker counts its job once the task returns, a moment after the job's end committed
        # (which is what `finished` saw): the sum across processes then shows one a lane.
        wait_for(lambda: counted() == [1, 1, 1], timeout=10, what="each lane's job counted")
        assert counted() == [1, 1, 1]
    finally:
        service.send_signal(signal.SIGTERM)  # as systemd does: every process is stopped warmly
        try:
            exit_code = service.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            raise
    assert exit_code == 0, log.read_text()[-3000:]
    # Nothing it started is left running.
    time.sleep(0.5)
    leftover = subprocess.run(
        ["pgrep", "-g", str(service.pid)], capture_output=True, text=True
    ).stdout.split()
    assert leftover == [], log.read_text()[-3000:]
