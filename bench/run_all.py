"""Run every benchmark in turn (`make bench`) and print one JSON object keyed by bench name.

    .venv/bin/python bench/run_all.py [--quick] [--only batch_writes,priority]

Each bench runs as its own process (its progress goes to stderr as it runs); one that fails or
overruns its time is reported as {"error": ...} and the others still run. `--quick` shortens
every bench to a smoke run (about a tenth of the time; the numbers are then only indicative).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> (full-run arguments, quick-run arguments, timeout in seconds for a full run)
BENCHES: dict[str, tuple[list[str], list[str], float]] = {
    "batch_writes": ([], ["--clients", "2", "--duration", "5", "--warmup", "2"], 480),
    "pipeline_overhead": ([], ["--jobs", "150"], 660),
    "pipeline_instructions": ([], ["--jobs", "40", "--baseline-jobs", "20"], 1200),
    "priority": ([], ["--backlog", "2000", "--samples", "20", "--patches", "40"], 360),
    "backpressure": ([], ["--duration", "10"], 660),
    # Search quality (about 30 s); local is skipped with a note where that embedder is missing.
    "recall": ([], ["--quick"], 600),
    # The service as `make run` starts it, with a fake model answering after a delay.
    "job_throughput": ([], ["--quick"], 1800),
    # Search latency at 10,000 memories (as shipped and the harness's web), with the breakdown.
    # bench/search_million.py stays out: it runs for half an hour.
    "search": (["--breakdown"], ["--quick"], 900),
    # Someone else's bench: run if present, with its own defaults.
    "sse_fanout": ([], ["--counts", "1,100", "--httpx-counts", "1", "--events", "50"], 900),
    # Write -> LocalCache latency with 10 and 100 caches, the service as shipped; ~1 min.
    "cache_propagation": ([], ["--caches", "10", "--writes", "50"], 300),
}


def run_one(name: str, arguments: list[str], timeout: float) -> dict[str, Any]:
    """Run bench/<name>.py; its stdout is its JSON. On overrun it gets SIGTERM (each bench stops
    its own servers on it), then SIGKILL."""
    print(f"=== {name} {' '.join(arguments)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(HERE / f"{name}.py"), *arguments],
        cwd=HERE.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except KeyboardInterrupt:
        # The bench got the same Ctrl-C: let it stop its servers before we go.
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, _ = process.communicate()
        return {"error": f"timed out after {timeout:.0f}s", "stdout": stdout[-2000:]}
    elapsed = round(time.monotonic() - started, 1)
    if process.returncode != 0:
        return {"error": f"exit code {process.returncode}", "stdout": stdout[-2000:]}
    try:
        return json.loads(stdout)
    except ValueError:
        return {"error": "stdout is not one JSON object", "stdout": stdout[-2000:], "s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke runs")
    parser.add_argument("--only", default="", help="comma-separated bench names")
    args = parser.parse_args()
    chosen = [name for name in args.only.split(",") if name] or list(BENCHES)
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        sys.exit(f"unknown bench(es): {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {}
    try:
        for name in chosen:
            if not (HERE / f"{name}.py").exists():
                continue
            full, quick, timeout = BENCHES[name]
            results[name] = run_one(name, quick if args.quick else full, timeout)
    except KeyboardInterrupt:
        # The running bench got the same Ctrl-C and stopped its own servers.
        results["interrupted"] = True
    print(json.dumps(results, indent=2), flush=True)
    failed = [n for n, result in results.items() if isinstance(result, dict) and "error" in result]
    sys.exit(1 if failed or results.get("interrupted") else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
