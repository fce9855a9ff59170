"""Instructions per memory job in the web and worker processes, counted by callgrind, end to end
(`POST /v1/memories` -> `success`, instant offline models). Prints one JSON object.

    .venv/bin/python bench/pipeline_instructions.py [--jobs 150] [--baseline-jobs 50]

CPU time on this shared 2-core machine moves by ±30 % from one run to the next, which hides a
change of a few percent; the count of instructions the processes execute is the same from run to
run (±0.5 % here), whatever else the machine does. It leaves out the kernel's share of each
system call, so it complements `pipeline_overhead.py` (CPU time) rather than replacing it.

How: uvicorn and a Celery worker (`default` lane, prefork, --concurrency 1) run under
`valgrind --tool=callgrind`. After a warm-up the web process and the worker's main process have
their counters zeroed and dumped around the measured jobs (`callgrind_control`). The pool child
does not answer `callgrind_control`, so the bench runs twice, with `--baseline-jobs` and with
`--jobs`, and takes the child's per-job count from the difference of its two lifetime totals.
Under valgrind everything runs ~50x slower: the default run takes about three minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import common

WARMUP_JOBS = 30


def _callgrind_totals(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def _wait_healthy(web: common.ManagedProcess, port: int) -> None:
    import httpx

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    common._wait_until(healthy, web, timeout=600)


def run_round(bench: common.BenchEnv, tenancy: common.Tenancy, jobs: int) -> dict[str, float]:
    """Start web and worker under callgrind, run the warm-up and `jobs` jobs; return the
    instructions of the web and worker main process over the measured jobs, and the pool child's
    over its whole life."""
    out_dir = Path(tempfile.mkdtemp(prefix="memory-bench-callgrind-"))
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/cg.%p.out"]
    env = {**bench.env, "PYTHONHASHSEED": "0"}
    port = common.free_port()
    web = common.spawn(
        "web-callgrind",
        [
            *valgrind, sys.executable, "-m", "uvicorn", "memoryproject.asgi:application",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--no-access-log", "--log-level", "warning",
        ],
        env,
    )  # fmt: skip
    ready_file = out_dir / "worker-ready"
    worker = common.spawn(
        "worker-callgrind",
        [
            *valgrind, sys.executable, str(Path(common.__file__).resolve()), "celery-worker",
            "-Q", "default", "-n", f"callgrind-{uuid.uuid4().hex[:8]}@%h",
            "--concurrency", "1", "--pool", "prefork",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING",
        ],
        {**env, "BENCH_READY_FILE": str(ready_file)},
    )  # fmt: skip
    try:
        _wait_healthy(web, port)
        common._wait_until(ready_file.exists, worker, timeout=600)
        server = common.WebServer(web, port)

        def run_jobs(tag: str, count: int) -> None:
            request_ids, _, refused = common.submit_jobs(server, tenancy, tag, count, clients=2)
            success, failure, _ = common.wait_requests_finished(bench, request_ids, timeout=1800)
            if refused or success != count:
                outcome = f"{success} success, {failure} failed, {refused} refused"
                raise RuntimeError(f"{count} jobs: {outcome}")

        run_jobs(f"warm{port}", WARMUP_JOBS)
        time.sleep(2)  # let the outbox marks and lease threads go quiet before counting
        subprocess.run(["callgrind_control", "--zero"], check=True, capture_output=True)
        run_jobs(f"m{port}", jobs)
        subprocess.run(["callgrind_control", "--dump"], check=True, capture_output=True)
    finally:
        worker.stop(timeout=120)
        web.stop(timeout=120)
    counted = {
        "web": _callgrind_totals(next(out_dir.glob(f"cg.{web.pid}.out.*"))),
        "worker_main": _callgrind_totals(next(out_dir.glob(f"cg.{worker.pid}.out.*"))),
    }
    children = [
        path
        for path in out_dir.glob("cg.*.out")
        if path.name not in (f"cg.{web.pid}.out", f"cg.{worker.pid}.out")
    ]
    if len(children) != 1:
        raise RuntimeError(f"expected one pool child's profile, found {len(children)}")
    counted["worker_child_lifetime"] = _callgrind_totals(children[0])
    shutil.rmtree(out_dir, ignore_errors=True)
    return counted


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=150)
    parser.add_argument("--baseline-jobs", type=int, default=50)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=1800, help="total runtime cap")
    args = parser.parse_args()
    if args.jobs <= args.baseline_jobs:
        parser.error("--jobs must exceed --baseline-jobs")
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("valgrind (with callgrind_control) is needed: apt-get install valgrind")
    common.install_runtime_cap(args.max_seconds)
    started = time.monotonic()
    try:
        bench = common.prepare(
            {"BACKPRESSURE_MAX_DEPTH": 10_000_000, "BACKPRESSURE_HIGH_MAX_DEPTH": 10_000_000}
        )
        tenancy = common.create_tenancy("bench-instructions", args.users)
        common.log(f"round 1: {args.baseline_jobs} jobs under callgrind")
        baseline = run_round(bench, tenancy, args.baseline_jobs)
        common.log(f"round 2: {args.jobs} jobs under callgrind")
        measured = run_round(bench, tenancy, args.jobs)
    finally:
        common.stop_all()
    child = (measured["worker_child_lifetime"] - baseline["worker_child_lifetime"]) / (
        args.jobs - args.baseline_jobs
    )
    per_job = {
        "web": measured["web"] / args.jobs,
        "worker_main": measured["worker_main"] / args.jobs,
        "worker_pool_child": child,
    }
    per_job["total"] = sum(per_job.values())
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout
    return {
        "benchmark": "pipeline_instructions",
        "config": {
            "jobs": args.jobs,
            "baseline_jobs": args.baseline_jobs,
            "warmup_jobs": WARMUP_JOBS,
            "web": "uvicorn --workers 1",
            "worker": "one celery worker on `default`, prefork, --concurrency 1",
            "llm": "offline rule-based (instant), offline hashing embedder",
            "valgrind": version.strip(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "million_instructions_per_job": {name: round(v / 1e6, 3) for name, v in per_job.items()},
        "notes": [
            "user-space instructions only; the kernel's work in system calls is not counted",
            "includes the offline models' own work (see provider_cpu_ms_per_job in "
            "pipeline_overhead.py for its CPU share)",
        ],
        "total_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    common.run_main("pipeline_instructions", main)
