"""Memory jobs per second end to end (`POST /v1/memories` -> `success`) and the CPU each job costs
in the web and worker process trees, with the instant offline LLM, so what is measured is the
framework around the model calls. Prints one JSON object.

    .venv/bin/python bench/pipeline_overhead.py [--jobs 600] [--concurrency 1,2]

One uvicorn worker; ONE Celery worker process on the `default` lane, run first with
`--concurrency 1`, then with `--concurrency 2` (prefork: 1 or 2 pool processes). The N jobs are
POSTed as fast as a few client threads can, then the bench waits until all are `success`
(polling PostgreSQL directly, so the web process serves the POSTs and nothing else).
Target (issue): framework overhead < 5 ms CPU per job.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from typing import Any

import common

TARGET_OVERHEAD_CPU_MS = 5.0


def provider_cpu_ms_per_job(jobs: int = 300) -> float:
    """CPU of the offline models alone for such jobs (extract, embed, decide against five
    neighbours per fact), measured in this process: the part of a worker's CPU that is not
    framework."""
    from memories.providers import ExistingMemory
    from memories.providers.wiring import get_embedder, get_llm

    llm, embedder = get_llm(), get_embedder()
    started = time.process_time()
    for n in range(jobs):
        facts = llm.extract_facts(common.job_messages("probe", n))
        embedder.embed(facts)
        neighbours = 5 * len(facts)
        shown = [
            ExistingMemory(id=i + 1, text=f"Likes hobbyprobex{n - i}") for i in range(neighbours)
        ]
        llm.decide(facts, shown)
    return (time.process_time() - started) * 1000 / jobs


def run_phase(
    *,
    bench: common.BenchEnv,
    web: common.WebServer,
    tenancy: common.Tenancy,
    concurrency: int,
    jobs: int,
    clients: int,
    wait_timeout: float,
    provider_ms: float,
) -> dict[str, Any]:
    worker = common.start_worker(bench, lane="default", concurrency=concurrency)
    pids = {
        "web": web.process.pid,
        "worker": worker.pid,
        **common.server_pids(bench),
        "bench_client": os.getpid(),
    }
    tag = uuid.uuid4().hex[:6]
    try:
        sessions_before = common.pg_sessions(bench)
        cpu_before = common.cpu_snapshot(pids)
        first_post = time.time()
        request_ids, latencies, refused = common.submit_jobs(web, tenancy, tag, jobs, clients)
        submitted = time.time()
        success, failure, last_finished = common.wait_requests_finished(
            bench, request_ids, wait_timeout
        )
        cpu = common.cpu_delta(cpu_before, common.cpu_snapshot(pids))
        time.sleep(1.0)  # PostgreSQL flushes its statistics about once a second
        # Minus the two this bench opens itself (the poller, and this reading).
        sessions = common.pg_sessions(bench) - sessions_before - 2
    finally:
        worker.stop()
    elapsed = (last_finished or time.time()) - first_post
    accepted = len(request_ids)
    per_job = {name: round(seconds * 1000 / max(success, 1), 2) for name, seconds in cpu.items()}
    framework_ms = per_job["web"] + per_job["worker"] - provider_ms
    return {
        "worker": f"1 process, --concurrency {concurrency}",
        "jobs_accepted": accepted,
        "jobs_refused": refused,
        "jobs_success": success,
        "jobs_failure": failure,
        "jobs_per_s": round(success / elapsed, 1) if elapsed > 0 else None,
        "seconds_first_post_to_last_success": round(elapsed, 2),
        "post_rate_per_s": round(accepted / (submitted - first_post), 1),
        "post_latency": common.latency_summary(latencies),
        "cpu_ms_per_job": per_job,
        "framework_cpu_ms_per_job": round(framework_ms, 2),
        "worker_framework_cpu_ms_per_job": round(per_job["worker"] - provider_ms, 2),
        "postgres_sessions_opened_per_job": round(sessions / max(accepted, 1), 2),
    }


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--concurrency", default="1,2", help="worker concurrencies, in turn")
    parser.add_argument("--clients", type=int, default=4, help="client threads posting")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--wait-timeout", type=float, default=180)
    parser.add_argument("--max-seconds", type=float, default=600, help="total runtime cap")
    args = parser.parse_args()
    common.install_runtime_cap(args.max_seconds)
    started = time.monotonic()
    load_at_start = common.machine()
    try:
        bench = common.prepare(
            {"BACKPRESSURE_MAX_DEPTH": 10_000_000, "BACKPRESSURE_HIGH_MAX_DEPTH": 10_000_000}
        )
        tenancy = common.create_tenancy("bench-pipeline", args.users)
        provider_ms = provider_cpu_ms_per_job()
        web = common.start_web(bench, workers=1)
        phases = []
        for concurrency in [int(c) for c in args.concurrency.split(",") if c]:
            common.log(f"{args.jobs} jobs, worker --concurrency {concurrency}")
            phases.append(
                run_phase(
                    bench=bench,
                    web=web,
                    tenancy=tenancy,
                    concurrency=concurrency,
                    jobs=args.jobs,
                    clients=args.clients,
                    wait_timeout=args.wait_timeout,
                    provider_ms=provider_ms,
                )
            )
            common.log(
                f"  {phases[-1]['jobs_per_s']} jobs/s, "
                f"framework {phases[-1]['framework_cpu_ms_per_job']} ms CPU/job"
            )
    finally:
        common.stop_all()
    return {
        "benchmark": "pipeline_overhead",
        "machine": load_at_start,
        "config": {
            "web": "uvicorn --workers 1",
            "worker": "one celery worker on `default`, prefork, --concurrency as per phase",
            "jobs": args.jobs,
            "client_threads": args.clients,
            "users": args.users,
            "llm": "offline rule-based (instant), offline hashing embedder",
        },
        "provider_cpu_ms_per_job": round(provider_ms, 3),
        "phases": phases,
        "notes": [
            "cpu_ms_per_job: CPU of each process tree from first POST to last success / jobs",
            "framework_cpu_ms_per_job = web + worker - provider_cpu_ms_per_job",
            "postgres and redis are the shared embedded servers (anything else using them "
            "counts too)",
        ],
        "target_framework_cpu_ms_per_job": TARGET_OVERHEAD_CPU_MS,
        "meets_target": all(p["framework_cpu_ms_per_job"] < TARGET_OVERHEAD_CPU_MS for p in phases),
        "total_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    common.run_main("pipeline_overhead", main)
