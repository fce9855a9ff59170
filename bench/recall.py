"""Search quality on a hand-written labelled set: recall@5, recall@10, hit rate and MRR of
`POST /v1/memories/search` per embedder and mode (hybrid, vector, keyword), overall and per query
category, with the search latency seen through the API. Prints one JSON object.

    .venv/bin/python bench/recall.py [--embedders offline,local] [--modes hybrid,vector,keyword]
                                     [--quick] [--no-dates] [--details]

The set (bench/data/recall_set.json) is ten invented people, 32 dated memories each, and queries
labelled with the ids of the memories that answer them, in five categories: keyword, paraphrase,
temporal ("what did she do in May 2025?": needs the memory's date), multi_hop (needs two
memories) and negation (a fact that changed). Memories go in through `POST /v1/memories/batch`,
each with `occurred_at` (its date; a server that does not know the field ignores it, and the JSON
says so). The embedder is a server setting: the service is started once per embedder
(EMBEDDING_PROVIDER), and one that fails to start or to embed is skipped with a note.

Metrics per query, averaged over queries: recall@k = the share of its relevant memories in the
top k; hit@k = 1 if any of them is; MRR = 1 / the rank of the first relevant one in the top 10
(0 if none). Latency is one client, one search at a time, after a few warm-up searches.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common

DATA = Path(__file__).resolve().parent / "data" / "recall_set.json"
MODES = ("hybrid", "vector", "keyword")
CATEGORIES = ("keyword", "paraphrase", "temporal", "multi_hop", "negation")
KS = (5, 10)
LIMIT = max(KS)
QUICK_USERS = 3
WARMUP_SEARCHES = 5
MAX_SEARCHES = 20_000  # a bound on the search loop, whatever the data holds


@dataclass
class Outcome:
    """One query's result in one mode: the ranks (1-based) of its relevant memories found in the
    top LIMIT, and the search's latency."""

    query_id: str
    category: str
    relevant: int
    ranks: list[int]
    seconds: float

    def recall(self, k: int) -> float:
        return sum(rank <= k for rank in self.ranks) / self.relevant

    def hit(self, k: int) -> float:
        return 1.0 if any(rank <= k for rank in self.ranks) else 0.0

    def reciprocal_rank(self) -> float:
        return 1 / min(self.ranks) if self.ranks else 0.0


def load_set(path: Path, users: int | None) -> dict[str, Any]:
    """The labelled set, cut to its first `users` users when asked."""
    dataset = json.loads(path.read_text())
    if users is not None:
        dataset["users"] = dataset["users"][:users]
    return dataset


def occurred_at(date: str) -> str:
    """A memory's date as an ISO 8601 instant: noon UTC, so no time zone moves it to another day."""
    return date if "T" in date else f"{date}T12:00:00Z"


def write_memories(
    http: Any, dataset: dict[str, Any], user_ids: dict[str, str], with_dates: bool
) -> dict[str, str]:
    """Create every memory through the batch API; return label id -> server id."""
    labels: list[str] = []
    items: list[dict[str, Any]] = []
    for user in dataset["users"]:
        for memory in user["memories"]:
            item = {"user_id": user_ids[user["id"]], "content": memory["content"], "type": "fact"}
            if with_dates:
                item["occurred_at"] = occurred_at(memory["date"])
            labels.append(memory["id"])
            items.append(item)
    server_ids: dict[str, str] = {}
    for start in range(0, len(items), 1000):  # BATCH_MAX_ITEMS
        response = http.post("/v1/memories/batch", json={"items": items[start : start + 1000]})
        if response.status_code != 200:
            raise RuntimeError(f"batch write: {response.status_code} {response.text[:300]}")
        for result in response.json()["results"]:
            if result["status"] != "ok":
                label = labels[start + result["index"]]
                raise RuntimeError(f"batch write of {label} failed: {result.get('error')}")
            server_ids[labels[start + result["index"]]] = str(result["id"])
    return server_ids


def dates_stored(http: Any, server_id: str, date: str) -> bool:
    """Whether the server kept a memory's occurred_at (it answers with the field), or dropped it
    as an unknown item field."""
    response = http.get(f"/v1/memories/{server_id}")
    response.raise_for_status()
    value = response.json().get("occurred_at")
    return isinstance(value, str) and value.startswith(date[:10])


def run_queries(
    http: Any,
    dataset: dict[str, Any],
    user_ids: dict[str, str],
    server_ids: dict[str, str],
    mode: str,
) -> list[Outcome]:
    """Every query once, one at a time, after a few unmeasured warm-up searches."""
    by_server_id = {server: label for label, server in server_ids.items()}
    queries = [(user, query) for user in dataset["users"] for query in user["queries"]]
    for user, query in queries[:WARMUP_SEARCHES]:
        search(http, user_ids[user["id"]], query["query"], mode)
    outcomes: list[Outcome] = []
    for user, query in queries[:MAX_SEARCHES]:
        started = time.monotonic()
        results = search(http, user_ids[user["id"]], query["query"], mode)
        elapsed = time.monotonic() - started
        found = [by_server_id.get(result["id"]) for result in results]
        relevant = set(query["relevant"])
        ranks = [rank for rank, label in enumerate(found, start=1) if label in relevant]
        outcomes.append(Outcome(query["id"], query["category"], len(relevant), ranks, elapsed))
    return outcomes


def search(http: Any, user_id: str, query: str, mode: str) -> list[dict[str, Any]]:
    body = {"user_id": user_id, "query": query, "limit": LIMIT, "mode": mode}
    response = http.post("/v1/memories/search", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"search ({mode}): {response.status_code} {response.text[:300]}")
    return response.json()["results"]


def scores(outcomes: list[Outcome]) -> dict[str, Any]:
    """The averages over these queries, rounded for reading."""
    n = len(outcomes)
    if not n:
        return {"queries": 0}

    def mean(values: list[float]) -> float:
        return round(sum(values) / n, 3)

    result: dict[str, Any] = {"queries": n}
    for k in KS:
        result[f"recall@{k}"] = mean([o.recall(k) for o in outcomes])
    for k in KS:
        result[f"hit@{k}"] = mean([o.hit(k) for o in outcomes])
    result[f"mrr@{LIMIT}"] = mean([o.reciprocal_rank() for o in outcomes])
    return result


def mode_report(outcomes: list[Outcome], details: bool) -> dict[str, Any]:
    latency = common.latency_summary([o.seconds for o in outcomes])
    report: dict[str, Any] = {
        "overall": scores(outcomes),
        "by_category": {
            category: scores([o for o in outcomes if o.category == category])
            for category in CATEGORIES
            if any(o.category == category for o in outcomes)
        },
        "latency": latency,
        "missed_at_10": [o.query_id for o in outcomes if not o.ranks],
    }
    if details:
        report["ranks"] = {o.query_id: o.ranks for o in outcomes}
    return report


def run_embedder(
    bench: common.BenchEnv, embedder: str, dataset: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Start the service with this embedder, write the set for fresh users, search it in every
    mode; the service is stopped on return."""
    common.log(f"--- embedder {embedder}: starting the service")
    before = list(common._started)
    try:
        web = common.start_web(bench, env=bench.with_settings(EMBEDDING_PROVIDER=embedder))
    except RuntimeError as exc:
        for process in [p for p in common._started if p not in before]:
            process.stop()
        last_lines = [line for line in str(exc).splitlines() if line.strip()][-2:]
        return {
            "skipped": f"the service did not start with EMBEDDING_PROVIDER={embedder}",
            "detail": " | ".join(line.strip() for line in last_lines),
        }
    try:
        tenancy = common.create_tenancy(f"recall-{embedder}", len(dataset["users"]))
        user_ids = {
            user["id"]: uid for user, uid in zip(dataset["users"], tenancy.user_ids, strict=True)
        }
        with common.http_client(web.base_url, tenancy.headers, timeout=300) as http:
            started = time.monotonic()
            try:
                server_ids = write_memories(http, dataset, user_ids, args.dates)
            except RuntimeError as exc:
                return {
                    "skipped": f"writing the set failed with EMBEDDING_PROVIDER={embedder}",
                    "detail": str(exc),
                }
            write_seconds = time.monotonic() - started
            common.log(f"wrote {len(server_ids)} memories in {write_seconds:.1f}s")
            first = dataset["users"][0]["memories"][0]
            stored = dates_stored(http, server_ids[first["id"]], first["date"])
            result: dict[str, Any] = {
                "memories_written": len(server_ids),
                "write_seconds": round(write_seconds, 2),
                "occurred_at": ("stored" if stored else "sent, not echoed by GET /v1/memories/{id}")
                if args.dates
                else "not sent (--no-dates)",
                "modes": {},
            }
            for mode in args.modes:
                common.log(f"{embedder}/{mode}: searching")
                outcomes = run_queries(http, dataset, user_ids, server_ids, mode)
                result["modes"][mode] = mode_report(outcomes, args.details)
            return result
    finally:
        web.process.stop()


def table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per embedder x mode: the figures to read first."""
    rows = []
    for embedder, result in results.items():
        for mode, report in result.get("modes", {}).items():
            overall = report["overall"]
            rows.append(
                {
                    "embedder": embedder,
                    "mode": mode,
                    **{key: value for key, value in overall.items() if key != "queries"},
                    "p50_ms": report["latency"]["p50_ms"],
                    "p99_ms": report["latency"]["p99_ms"],
                    **{
                        f"{category}_recall@5": scores_["recall@5"]
                        for category, scores_ in report["by_category"].items()
                    },
                }
            )
    return rows


def describe(dataset: dict[str, Any], path: Path) -> dict[str, Any]:
    queries = [query for user in dataset["users"] for query in user["queries"]]
    return {
        "file": str(path),
        "users": len(dataset["users"]),
        "memories": sum(len(user["memories"]) for user in dataset["users"]),
        "queries": len(queries),
        "queries_by_category": {
            category: sum(query["category"] == category for query in queries)
            for category in CATEGORIES
        },
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--embedders",
        default="offline,local",
        help="EMBEDDING_PROVIDER values, one service start each",
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--users", type=int, default=None, help="only the first N users")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: the first {QUICK_USERS} users"
    )
    parser.add_argument(
        "--dates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send each memory's date as occurred_at (default on)",
    )
    parser.add_argument(
        "--details", action="store_true", help="add every query's ranks of its relevant memories"
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--max-seconds", type=float, default=900)
    args = parser.parse_args()
    args.embedders = [name for name in args.embedders.split(",") if name]
    args.modes = [name for name in args.modes.split(",") if name]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    if args.quick and args.users is None:
        args.users = QUICK_USERS
    return args


def main() -> dict[str, Any]:
    args = parse_args()
    common.install_runtime_cap(args.max_seconds)
    began = time.monotonic()
    machine = common.machine()
    dataset = load_set(args.data, args.users)
    bench = common.prepare()
    results: dict[str, Any] = {}
    for embedder in args.embedders:
        if not re.fullmatch(r"[a-z0-9_-]+", embedder):
            results[embedder] = {"skipped": "not an EMBEDDING_PROVIDER name"}
            continue
        try:
            results[embedder] = run_embedder(bench, embedder, dataset, args)
        except common.BenchTimeout:
            raise
        except Exception as exc:  # one embedder's failure is reported, the others still run
            common.log(f"{embedder} failed: {exc!r}")
            results[embedder] = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:1500]}
        if "skipped" in results[embedder]:
            common.log(f"{embedder} skipped: {results[embedder]['skipped']}")
    common.stop_all()
    return {
        "benchmark": "recall",
        "machine": machine,
        "config": {
            "embedders": args.embedders,
            "modes": args.modes,
            "limit": LIMIT,
            "dates_sent": args.dates,
            "web": "uvicorn --workers 1, one client, one search at a time",
        },
        "dataset": describe(dataset, args.data),
        "table": table(results),
        "results": results,
        "total_seconds": round(time.monotonic() - began, 1),
    }


if __name__ == "__main__":
    common.run_main("recall", main)
