"""mem0 (2.x, as a library) beside this service, in one run, on the same fake OpenAI-compatible
server: memory jobs a second, closed loop, for 1 and 4 client threads. Prints one JSON object.

mem0 is not a dependency of the project: run this file with a Python that has it, the project's
own venv starting the fake server and the service's bench:

    python3 -m venv /tmp/mem0 && /tmp/mem0/bin/pip install mem0ai==2.2.1
    /tmp/mem0/bin/python bench/mem0_side_by_side.py [--clients 1,4] [--seconds 15]
        [--llm-delay-ms 0] [--project-python .venv/bin/python]

- The fake: tests/fake_openai.py in its own process (the project's Python), rule-based answers:
  the service's two prompts, and mem0's one extraction prompt with the same facts.
- mem0: `Memory.add(messages, user_id=..., infer=True)`, its defaults otherwise (Qdrant in
  process, in memory; SQLite history in a scratch folder), the LLM and the embedder pointed at the
  fake (384 dimensions). Each client thread sends its own users' conversations (the same generator
  as bench/job_throughput.py, through the project's Python), one after another, for `--seconds`.
  mem0's CPU is its process's (and the fake's, counted apart).
- The service: bench/job_throughput.py with the same delay, closed loop, the same client counts,
  once polling `GET /v1/requests/{id}` and once posting with `"wait"` (its JSON is kept whole).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Before mem0 is imported: it would send usage events to PostHog (this bench talks to loopback
# only).
os.environ["MEM0_TELEMETRY"] = "False"

ROOT = Path(__file__).resolve().parent.parent
DIMENSIONS = 384


def conversations(project_python: str, users: int, per_user: int) -> list[list[list[dict]]]:
    """Each user's conversations, from bench/job_throughput.py's generator (the project's code)."""
    code = (
        "import json, sys; sys.path[:0] = ['bench']\n"
        "from job_throughput import user_conversations\n"
        f"print(json.dumps([user_conversations('mem0', u, {per_user}) for u in range({users})]))"
    )
    done = subprocess.run(
        [project_python, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def start_fake(project_python: str, delay_ms: float) -> tuple[subprocess.Popen, str]:
    command = [project_python, "-m", "tests.fake_openai", "--port", "0",
               "--delay", str(delay_ms / 1000), "--dimensions", str(DIMENSIONS)]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem0_memory(base_url: str, folder: str) -> Any:
    from mem0 import Memory

    return Memory.from_config(
        {
            "llm": {"provider": "openai", "config": {
                "model": "gpt-4.1-nano", "api_key": "fake", "openai_base_url": base_url}},
            "embedder": {"provider": "openai", "config": {
                "model": "text-embedding-3-small", "api_key": "fake",
                "openai_base_url": base_url, "embedding_dims": DIMENSIONS}},
            "vector_store": {"provider": "qdrant", "config": {
                "collection_name": "bench", "embedding_model_dims": DIMENSIONS,
                "path": f"{folder}/qdrant", "on_disk": False}},
            "history_db_path": f"{folder}/history.db",
        }
    )  # fmt: skip


def mem0_closed_loop(
    memories: list[Any], users: list[list[list[dict]]], *, seconds: float, fake_pid: int
) -> dict[str, Any]:
    """A thread per Memory, each adding its users' conversations one after another. One Memory a
    thread: a Memory shared by threads fails most adds (its local Qdrant and SQLite history are
    not made for it), so each client is its own library instance, as separate agents would be."""
    clients = len(memories)
    done, failed, latencies = [0] * clients, [0] * clients, [[] for _ in range(clients)]
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        memory = memories[index]
        mine = users[index::clients]
        for round_ in range(len(mine[0])):
            for n, conversation in enumerate(user[round_] for user in mine):
                if time.monotonic() > stop_at:
                    return
                started = time.perf_counter()
                try:
                    memory.add(conversation, user_id=f"c{clients}-u{index}-{n}", infer=True)
                except Exception as exc:
                    failed[index] += 1
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                latencies[index].append(time.perf_counter() - started)
                done[index] += 1

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    fake_before = process_cpu_seconds(fake_pid)
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    jobs = sum(done)
    ordered = sorted(x for per in latencies for x in per)
    return {
        "clients": clients,
        "jobs": jobs,
        "failed": sum(failed),
        "first_errors": errors[:3],
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(jobs / elapsed, 2),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 2) if ordered else None,
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2) if ordered else None,
        "cpu_ms_per_job": round(1000 * cpu / jobs, 2) if jobs else None,
        "fake_llm_cpu_ms_per_job": round(
            1000 * (process_cpu_seconds(fake_pid) - fake_before) / jobs, 2
        ) if jobs else None,
    }  # fmt: skip


def service_bench(project_python: str, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    command = [project_python, "bench/job_throughput.py", "--llm-delay-ms", str(args.llm_delay_ms),
               "--mode", "closed-loop", "--clients", args.clients, *extra]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--llm-delay-ms", type=float, default=0)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--project-python", default=str(ROOT / ".venv/bin/python"))
    parser.add_argument("--skip-service", action="store_true", help="mem0 only")
    args = parser.parse_args()
    from importlib.metadata import version

    import mem0  # noqa: F401  (fails at once, saying what to install, without mem0)

    result: dict[str, Any] = {
        "benchmark": "mem0_side_by_side",
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": list(os.getloadavg())},
        "config": {
            "llm_delay_ms": args.llm_delay_ms,
            "seconds": args.seconds,
            "mem0": version("mem0ai"),
            "users": args.users,
        },  # fmt: skip
    }
    users = conversations(args.project_python, args.users, 8)
    fake, base_url = start_fake(args.project_python, args.llm_delay_ms)
    try:
        result["mem0"] = []
        for clients in (int(c) for c in args.clients.split(",")):
            with tempfile.TemporaryDirectory() as folder:
                memories = [mem0_memory(base_url, f"{folder}/{n}") for n in range(clients)]
                for memory in memories:
                    memory.add([{"role": "user", "content": "I like tea."}], user_id="warmup")
                result["mem0"].append(
                    mem0_closed_loop(memories, users, seconds=args.seconds, fake_pid=fake.pid)
                )
    finally:
        fake.terminate()
        fake.wait(timeout=10)
    if not args.skip_service:
        result["service_polling"] = service_bench(args.project_python, args)
        result["service_wait"] = service_bench(args.project_python, args, "--wait-seconds", "20")
        result["ratios"] = {}
        for run in ("service_polling", "service_wait"):
            for scenario in result[run]["scenarios"]:
                clients = scenario.get("clients")
                theirs = next((m for m in result["mem0"] if m["clients"] == clients), None)
                if theirs and theirs["jobs_per_s"]:
                    key = f"{run}_vs_mem0_{clients}_clients"
                    result["ratios"][key] = round(scenario["jobs_per_s"] / theirs["jobs_per_s"], 3)
    result["load_avg_at_end"] = list(os.getloadavg())
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
