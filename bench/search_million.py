"""Vector search at 1,000,000 memories, straight against PostgreSQL (no web service): the exact
per-user scan, a global HNSW index with pgvector's iterative scans, a per-user partial HNSW index
for comparison, and what the service ships (a partial index over big users' rows). Prints one
JSON object. Not in `make bench` (it runs for many minutes).

    .venv/bin/python bench/search_million.py [--rows 1000000] [--queries 100]
                                             [--ef-search 40,100,200,400] [--k 10] [--keep]
                                             [--max-seconds 1200]

Data: a scratch database `memory_bench_million` on the same server as the dev database (its own
name: `memory_bench` is dropped by the other benches), migrated with the project's migrations,
so table, indexes and triggers are the service's. Synthetic 384-dim unit vectors with cluster
structure (2,000 centroids; a row is its centroid plus noise of the same norm, normalised), so
an approximate index has real work: a user's ~25 rows of a cluster sit among ~500 of others.
Users: big ones of 50,000 memories (each spread over all the clusters) and many small ones of 50
(5 clusters of 10). Loaded with binary COPY in 50,000-row transactions.

Queries: each a centroid plus fresh noise. The truth for each is every one of the user's rows'
distance, fetched and sorted here (no ORDER BY in SQL: no index can take part). Every query runs
as the service sends SQL (Django binds, no server-side prepared statement: each is planned with
its user) with one client, one query at a time, after a warm-up:
- exact: `WHERE user_id = $1 AND deleted_at IS NULL AND valid_to IS NULL ORDER BY embedding <=>
  $2, id LIMIT 10`, today's selector (B-tree on the user, then the distance of each row);
- ann: the same rows' nearest in a MATERIALIZED CTE ordered by the distance alone (what an HNSW
  index can serve), re-sorted by (distance, id), with `hnsw.iterative_scan` and `hnsw.ef_search`
  set; the plan PostgreSQL picks is reported (EXPLAIN), for a big and a small user;
- shipped: what the service does (`--shipped-only` runs this alone): beat's refresh
  (memories.ann_index) marks the users of 10,000 memories or more and moves their rows into the
  partial HNSW index, timed; then the service's own statement (memories.nearest), exact for a
  small user, through that index for a big one; then the big user's again at each of
  `--ef-search` in place of SEARCH_ANN_EF_SEARCH.
The database is dropped at the end unless --keep.
"""

from __future__ import annotations

import os

# Before `common` reads it: this bench's own scratch database.
os.environ.setdefault("BENCH_DATABASE", "memory_bench_million")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import operator  # noqa: E402
import random  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from itertools import repeat  # noqa: E402
from typing import Any  # noqa: E402

import common  # noqa: E402

DIMENSIONS = 384
CENTROIDS = 2_000
NOISE_POOL = 4_096
NOISE_SCALE = 1.0  # noise norm / centroid norm: rows of one cluster have cosine ~0.5
BIG_USER_ROWS = 50_000
SMALL_USER_ROWS = 50
SMALL_USER_CLUSTERS = 5
K = 10  # results a query asks for (--k): a plain search asks 20, a hybrid leg 50
COPY_ROWS = 50_000
WARMUP = 10
TIE_EPSILON = 1e-6
SEED = 1_000_003
HNSW = "memory_embedding_hnsw"
PARTIAL_HNSW = "memory_embedding_hnsw_one_user"
TARGETS = {"big_user_recall_at_10": 0.98, "p50_ms": 25.0, "small_user_exact": 1.0}

_LIVE = "deleted_at IS NULL AND valid_to IS NULL"
EXACT_SQL = f"""
    SELECT id FROM memories_memory
    WHERE user_id = %(user)s AND {_LIVE}
    ORDER BY embedding <=> %(q)s::vector, id LIMIT %(k)s
"""
ANN_SQL = f"""
    WITH nearest AS MATERIALIZED (
        SELECT id, embedding <=> %(q)s::vector AS distance FROM memories_memory
        WHERE user_id = %(user)s AND {_LIVE}
        ORDER BY distance LIMIT %(k)s
    )
    SELECT id FROM nearest ORDER BY distance, id
"""
# The same, with the user's B-tree out of reach (a cast the index does not hold), to time the
# HNSW path where the planner would not take it.
ANN_FORCED_SQL = ANN_SQL.replace("WHERE user_id = %(user)s", "WHERE user_id::text = %(user)s")
TRUTH_SQL = f"""
    SELECT id, embedding <=> %(q)s::vector FROM memories_memory
    WHERE user_id = %(user)s AND {_LIVE}
"""


# --- Synthetic vectors ---------------------------------------------------------------------------


def _unit(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(map(operator.mul, values, values)))
    return list(map(operator.truediv, values, repeat(norm)))


class Vectors:
    """Clustered unit vectors in pure Python (no numpy in the project): a row is its centroid
    plus a noise vector from a pool, cyclically shifted (a shift of an i.i.d. Gaussian vector is
    another one), so a million distinct rows cost list operations done in C."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        gauss = self.rng.gauss
        self.centroids = [_unit([gauss(0, 1) for _ in range(DIMENSIONS)]) for _ in range(CENTROIDS)]
        pool = []
        for _ in range(NOISE_POOL):
            noise = [x * NOISE_SCALE for x in _unit([gauss(0, 1) for _ in range(DIMENSIONS)])]
            pool.append(noise + noise)  # doubled: a shift is one slice
        self.pool = pool
        self.packer = struct.Struct(f">HH{DIMENSIONS}f")

    def row(self, cluster: int, n: int) -> list[float]:
        """The n-th row's vector (n < NOISE_POOL * DIMENSIONS gives distinct noise)."""
        shift = (n // NOISE_POOL) % DIMENSIONS
        noise = self.pool[n % NOISE_POOL][shift : shift + DIMENSIONS]
        return _unit(list(map(operator.add, self.centroids[cluster], noise)))

    def query(self, cluster: int) -> list[float]:
        gauss = self.rng.gauss
        noise = _unit([gauss(0, 1) for _ in range(DIMENSIONS)])
        return _unit(
            [c + NOISE_SCALE * x for c, x in zip(self.centroids[cluster], noise, strict=True)]
        )

    def binary(self, vector: list[float]) -> bytes:
        """pgvector's binary format (dimensions, unused, big-endian float32s)."""
        return self.packer.pack(DIMENSIONS, 0, *vector)


def vector_text(vector: list[float]) -> str:
    import orjson

    return orjson.dumps(vector).decode()


# --- Loading -------------------------------------------------------------------------------------

MEMORY_COLUMNS = {
    "id": "bytea",  # uuid, as its 16 bytes
    "tenant_id": "bytea",
    "user_id": "bytea",
    "scope": "varchar",
    "topic": "varchar",
    "type": "varchar",
    "content": "text",
    "embedding": "bytea",  # vector, in pgvector's binary format
    "content_hash": "varchar",
    "metadata": "bytea",  # jsonb: a version byte, then the text
    "agent_id": "varchar",
    "session_id": "varchar",
    "version": "int4",
    "vector_clock": "bytea",
    "created_at": "timestamptz",
    "updated_at": "timestamptz",
    "occurred_at": "timestamptz",
    "written_at": "timestamptz",
    "written_by": "varchar",
    "merge_rule": "varchar",
    "conflicted": "bool",
    "state": "bytea",
}


@dataclass
class Layout:
    """Who owns how many rows, and in which clusters."""

    big_users: list[uuid.UUID]
    small_users: list[uuid.UUID]
    rows: int
    # The small users' clusters (their queries are near one of them).
    small_clusters: dict[uuid.UUID, list[int]] = field(default_factory=dict)


def plan_layout(rows: int, rng: random.Random) -> Layout:
    """Big users of 50,000 rows (one per 250,000 rows, at least one), the rest in users of 50."""
    big = max(1, rows // 250_000)
    if big * BIG_USER_ROWS > rows:
        raise SystemExit(f"--rows must be at least {BIG_USER_ROWS}")
    small = (rows - big * BIG_USER_ROWS) // SMALL_USER_ROWS
    layout = Layout(
        big_users=[uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(big)],
        small_users=[uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(small)],
        rows=big * BIG_USER_ROWS + small * SMALL_USER_ROWS,
    )
    for user in layout.small_users:
        layout.small_clusters[user] = rng.sample(range(CENTROIDS), SMALL_USER_CLUSTERS)
    return layout


def owned_rows(layout: Layout, rng: random.Random) -> Any:
    """(user, cluster) for every row: each big user's rows over every cluster at random, each
    small user's in its own few clusters."""
    for user in layout.big_users:
        for _ in range(BIG_USER_ROWS):
            yield user, rng.randrange(CENTROIDS)
    per_cluster = SMALL_USER_ROWS // SMALL_USER_CLUSTERS
    for user in layout.small_users:
        for cluster in layout.small_clusters[user]:
            for _ in range(per_cluster):
                yield user, cluster


def load(conn: Any, *, tenant_id: uuid.UUID, layout: Layout, vectors: Vectors) -> dict:
    """End users, then memories, by binary COPY; generating the rows is timed apart from the
    COPY so the rate is PostgreSQL's."""
    now = datetime.now(UTC)
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cursor:
        statement = (
            "COPY memories_enduser (id, tenant_id, metadata, created_at) "
            "FROM STDIN WITH (FORMAT BINARY)"
        )
        with cursor.copy(statement) as copy:
            copy.set_types(["uuid", "uuid", "bytea", "timestamptz"])
            for user in layout.big_users + layout.small_users:
                copy.write_row((user, tenant_id, b"\x01{}", now))
    users_seconds = time.perf_counter() - started
    columns = ", ".join(MEMORY_COLUMNS)
    statement = f"COPY memories_memory ({columns}) FROM STDIN WITH (FORMAT BINARY)"
    rng = random.Random(SEED + 7)
    generate_seconds = copy_seconds = 0.0
    tenant = tenant_id.bytes
    chunk: list[tuple] = []
    written = 0

    def flush() -> None:
        nonlocal copy_seconds, written
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types(list(MEMORY_COLUMNS.values()))
            for row in chunk:
                copy.write_row(row)
        copy_seconds += time.perf_counter() - t0
        written += len(chunk)
        chunk.clear()
        if written % 200_000 == 0 or written == layout.rows:
            common.log(f"loaded {written:,} rows")

    t0 = time.perf_counter()
    for n, (user, cluster) in enumerate(owned_rows(layout, rng)):
        content = f"synthetic memory {n} (cluster {cluster})"
        chunk.append(
            (
                uuid.UUID(int=rng.getrandbits(128), version=4).bytes, tenant, user.bytes,
                "user", "", "fact", content, vectors.binary(vectors.row(cluster, n)),
                f"{n:064x}", b"\x01{}", "", "", 1, b"\x01{}", now, now, now,
                now, "", "lww", False, b"\x01{}",
            )
        )  # fmt: skip
        if len(chunk) == COPY_ROWS:
            generate_seconds += time.perf_counter() - t0
            flush()
            t0 = time.perf_counter()
    generate_seconds += time.perf_counter() - t0
    if chunk:
        flush()
    return {
        "rows": written,
        "users": {"big": len(layout.big_users), "small": len(layout.small_users)},
        "rows_per_user": {"big": BIG_USER_ROWS, "small": SMALL_USER_ROWS},
        "end_users_copy_seconds": round(users_seconds, 2),
        "rows_generation_seconds_python": round(generate_seconds, 1),
        "copy_seconds": round(copy_seconds, 1),
        "copy_rows_per_s": round(written / copy_seconds) if copy_seconds else None,
        "copy_rows_per_transaction": COPY_ROWS,
        "note": "COPY into the service's table as migrated: its B-trees, two GIN indexes "
        "(metadata, search_vector: a generated tsvector) and the change_txid trigger",
    }


# --- Measuring -----------------------------------------------------------------------------------


@dataclass
class Query:
    user: uuid.UUID
    text: str  # the vector, as pgvector's text
    truth: list[tuple[float, uuid.UUID]] = field(default_factory=list)


def with_truth(conn: Any, queries: list[Query]) -> None:
    """Each query's ranking over all its user's rows, computed here (see the module's opening)."""
    for query in queries:
        rows = conn.execute(TRUTH_SQL, {"q": query.text, "user": query.user}).fetchall()
        query.truth = sorted((float(distance), memory_id) for memory_id, distance in rows)


def recall_at_k(returned: list[uuid.UUID], truth: list[tuple[float, uuid.UUID]], k: int) -> float:
    """The share of the true top k returned; a row tied with the k-th at its distance counts."""
    k = min(k, len(truth))
    if not k:
        return 1.0
    kth = truth[k - 1][0]
    distance = {memory_id: d for d, memory_id in truth}
    hits = sum(1 for m in set(returned) if distance.get(m, 9.0) <= kth + TIE_EPSILON)
    return min(hits, k) / k


def run_queries(
    conn: Any, sql: str | Callable[[Query], tuple[str, Any]], queries: list[Query],
    *, forced: bool = False,
) -> dict:  # fmt: skip
    """One query at a time, the client's clock (round trip included), after a warm-up. `sql`:
    a statement of named parameters, or a function giving each query's statement and parameters
    (the service's own, `shipped_statement`)."""

    def statement(query: Query) -> tuple[str, Any]:
        return sql(query) if callable(sql) else (sql, _params(query, forced))

    for query in queries[:WARMUP]:
        conn.execute(*statement(query)).fetchall()
    seconds, recalls, returned = [], [], []
    for query in queries:
        started = time.perf_counter()
        ids = [row[0] for row in conn.execute(*statement(query)).fetchall()]
        seconds.append(time.perf_counter() - started)
        recalls.append(recall_at_k(ids, query.truth, K))
        returned.append(len(ids))
    return {
        "latency": common.latency_summary(seconds),
        f"recall@{K}": round(sum(recalls) / len(recalls), 4),
        "queries_with_all_true_top_k": round(sum(r == 1.0 for r in recalls) / len(recalls), 4),
        "rows_returned_mean": round(sum(returned) / len(returned), 2),
    }


def _params(query: Query, forced: bool) -> dict[str, Any]:
    return {"q": query.text, "user": str(query.user) if forced else query.user, "k": K}


def plan(
    conn: Any, sql: str | Callable[[Query], tuple[str, Any]], query: Query, *, forced: bool = False
) -> dict[str, Any]:
    """The plan PostgreSQL picks for this query: the index it uses and its estimated cost."""
    text, params = sql(query) if callable(sql) else (sql, _params(query, forced))
    explained = conn.execute("EXPLAIN (FORMAT JSON, ANALYZE, BUFFERS) " + text, params)
    explained = explained.fetchone()[0]
    top = explained[0]
    indexes: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if "Index Name" in node and node.get("Actual Loops", 1):  # a scan that ran
            indexes.append(node["Index Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(top["Plan"])
    buffers = top["Plan"].get("Shared Hit Blocks", 0) + top["Plan"].get("Shared Read Blocks", 0)
    return {
        "indexes": indexes,
        "total_cost": top["Plan"]["Total Cost"],
        "execution_ms": round(top["Execution Time"], 2),
        "buffers": buffers,
    }


@contextlib.contextmanager
def settings_set(conn: Any, **values: Any) -> Any:
    """Session settings for the block (hnsw.ef_search and the like), reset after it."""
    for name, value in values.items():
        conn.execute(f"SET {name.replace('__', '.')} = {value}")
    try:
        yield
    finally:
        for name in values:
            conn.execute(f"RESET {name.replace('__', '.')}")


def relation_mb(conn: Any, name: str) -> float:
    size = conn.execute("SELECT pg_total_relation_size(%s::regclass)", [name]).fetchone()[0]
    return round(size / 2**20, 1)


def build_index(conn: Any, sql: str, *, seconds_left: float, settings: dict[str, Any]) -> dict:
    """CREATE INDEX under a statement timeout (the rest of the time budget): a build that would
    overrun is cancelled and reported as such."""
    timeout_ms = max(int(seconds_left * 1000), 1000)
    started = time.perf_counter()
    try:
        with settings_set(conn, statement_timeout=timeout_ms, **settings):
            conn.execute(sql)
    except Exception as exc:  # the timeout, or memory
        return {"built": False, "error": f"{type(exc).__name__}: {exc}"[:300],
                "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    return {"built": True, "seconds": round(time.perf_counter() - started, 1)}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- Main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100, help="per user kind (big, small)")
    parser.add_argument("--ef-search", default="40,100,200,400")
    parser.add_argument("--k", type=int, default=K, help="results a query asks for")
    parser.add_argument("--m", type=int, default=16, help="HNSW m")
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--maintenance-work-mem", default="3GB", help="for the index builds")
    parser.add_argument("--build-workers", type=int, default=1, help="parallel build workers")
    parser.add_argument("--no-partial", action="store_true", help="skip the per-user index")
    parser.add_argument(
        "--shipped-only", action="store_true",
        help="only (d): the service's refresh and statement, no global or one-user index",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--quick", action="store_true", help="200,000 rows, 40 queries")
    parser.add_argument("--max-seconds", type=float, default=1200)
    args = parser.parse_args()
    args.ef_search = [int(v) for v in args.ef_search.split(",") if v]
    if args.quick:
        args.rows, args.queries = min(args.rows, 200_000), min(args.queries, 40)
    return args


def main() -> dict[str, Any]:
    global K
    args = parse_args()
    K = args.k
    common.install_runtime_cap(args.max_seconds)
    began = time.monotonic()
    # Work stops being started this long before the cap, so the report and the drop get done.
    deadline = began + args.max_seconds - 90
    result: dict[str, Any] = {
        "benchmark": "search_million",
        "machine": common.machine(),
        "config": {
            "database": common.BENCH_DATABASE,
            "dimensions": DIMENSIONS,
            "centroids": CENTROIDS,
            "noise_scale": NOISE_SCALE,
            "k": K,
            "queries_per_user_kind": args.queries,
            "hnsw": {
                "m": args.m,
                "ef_construction": args.ef_construction,
                "maintenance_work_mem": args.maintenance_work_mem,
                "max_parallel_maintenance_workers": args.build_workers,
            },  # fmt: skip
            "client": "psycopg, one query at a time, no server-side prepare (as Django)",
        },
        "targets": TARGETS,
        "load_average": {"start": load_avg()},
    }
    bench = common.prepare()
    from memories import accounts

    tenant = accounts.tenant_get_or_create(name="million")
    from django.db import connection as django_connection

    django_connection.close()
    conn = common.raw_connection(bench)
    conn.prepare_threshold = None  # as Django: every query planned with its own values
    try:
        body(args, conn, tenant_id=tenant.id, result=result, deadline=deadline)
    finally:
        conn.close()
        if args.keep:
            result["database_kept"] = common.BENCH_DATABASE
        else:
            drop_database(bench)
    result["meets_targets"] = verdict(result)
    result["load_average"]["end"] = load_avg()
    result["total_seconds"] = round(time.monotonic() - began, 1)
    return result


def shipped_statement(query: Query) -> tuple[str, list[Any]]:
    """The service's vector leg for a plain search (memories.search), cut to k: exact for a small
    user, through the approximate index for a big one (memories.nearest)."""
    from memories.nearest import user_nearest_sql

    sql, params = user_nearest_sql(
        vector="%s::vector", vector_params=[query.text], user_id=query.user, limit=K
    )
    return f"SELECT id FROM ({sql}) AS nearest ORDER BY distance, id LIMIT %s", [*params, K]


def shipped(
    conn: Any, *, big: list[Query], small: list[Query], deadline: float, ef_searches: list[int]
) -> dict:
    """(d) What the service ships: beat's refresh marks the users of 10,000 memories or more
    and moves their rows into the partial HNSW index, then the service's own statement runs,
    with the shipped SEARCH_ANN_EF_SEARCH and then each of `ef_searches` for the big user."""
    from django.conf import settings
    from django.db import connection as django_connection

    from memories.ann_index import ann_index_refresh

    load_before = load_avg()
    started = time.perf_counter()
    refreshed = ann_index_refresh(
        min_memories=10_000, budget_seconds=max(deadline - time.monotonic() - 120, 60)
    )
    seconds = time.perf_counter() - started
    # A run with nothing to move: what beat pays every SEARCH_ANN_REFRESH_SECONDS at this size.
    idle_started = time.perf_counter()
    ann_index_refresh(min_memories=10_000, budget_seconds=60)
    idle_seconds = time.perf_counter() - idle_started
    django_connection.close()
    conn.execute("ANALYZE memories_memory")
    figures: dict[str, Any] = {
        "refresh": {
            "users_marked": refreshed.users_marked,
            "rows_moved_in": refreshed.rows_indexed,
            "rows_left": refreshed.rows_left,
            "seconds": round(seconds, 1),
            "rows_per_s": round(refreshed.rows_indexed / seconds) if seconds else None,
            "idle_run_ms": round(idle_seconds * 1000, 1),
            "index_mb": relation_mb(conn, "memory_embedding_ann"),
            "load_average_before": load_before,
            "load_average_after": load_avg(),
        },
    }
    common.log(f"refresh: {figures['refresh']}")
    figures["big_user"] = {
        **run_queries(conn, shipped_statement, big),
        "plan_indexes": plan(conn, shipped_statement, big[0])["indexes"],
    }
    figures["small_user"] = {
        **run_queries(conn, shipped_statement, small),
        "plan_indexes": plan(conn, shipped_statement, small[0])["indexes"],
    }
    big_figures = figures["big_user"]
    common.log(f"shipped: big {big_figures['latency']} recall {big_figures[f'recall@{K}']}")
    # The same statement at other SEARCH_ANN_EF_SEARCH values (the setting is read per query):
    # what the default trades between recall and time.
    shipped_ef = settings.SEARCH_ANN_EF_SEARCH
    figures["big_user_by_ef_search"] = {}
    for ef_search in ef_searches:
        settings.SEARCH_ANN_EF_SEARCH = ef_search
        figures["big_user_by_ef_search"][ef_search] = run_queries(conn, shipped_statement, big)
        common.log(f"ef_search {ef_search}: {figures['big_user_by_ef_search'][ef_search]}")
    settings.SEARCH_ANN_EF_SEARCH = shipped_ef
    return figures


def body(args: argparse.Namespace, conn: Any, *, tenant_id: Any, result: dict, deadline: float):
    rng = random.Random(SEED)
    common.log("generating the noise pool and centroids")
    vectors = Vectors(SEED)
    layout = plan_layout(args.rows, rng)
    common.log(f"loading {layout.rows:,} rows")
    result["load"] = load(conn, tenant_id=tenant_id, layout=layout, vectors=vectors)
    started = time.perf_counter()
    conn.execute("VACUUM ANALYZE memories_memory")
    conn.execute("VACUUM ANALYZE memories_enduser")
    result["load"]["vacuum_analyze_seconds"] = round(time.perf_counter() - started, 1)
    result["load"]["table_mb"] = relation_mb(conn, "memories_memory")
    result["load_average"]["after_load"] = load_avg()

    big_user = layout.big_users[0]
    big = [Query(big_user, vector_text(vectors.query(rng.randrange(CENTROIDS))))
           for _ in range(args.queries)]  # fmt: skip
    small = [
        Query(user, vector_text(vectors.query(rng.choice(layout.small_clusters[user]))))
        for user in rng.sample(layout.small_users, min(args.queries, len(layout.small_users)))
    ]
    common.log("computing the truth of every query")
    with_truth(conn, big + small)

    if args.shipped_only:
        result["shipped"] = shipped(
            conn, big=big, small=small, deadline=deadline, ef_searches=args.ef_search
        )
        return
    common.log("(a) exact scan, every user's rows")
    result["exact_scan"] = {
        "sql": "the selector's: B-tree on the user, distance of each of the user's rows, sort",
        "big_user": {**run_queries(conn, EXACT_SQL, big), "plan": plan(conn, EXACT_SQL, big[0])},
        "small_user": {
            **run_queries(conn, EXACT_SQL, small),
            "plan": plan(conn, EXACT_SQL, small[0]),
        },
    }
    common.log(f"exact: big {result['exact_scan']['big_user']['latency']}")

    if time.monotonic() > deadline:
        result["hnsw"] = {"skipped": "time budget spent before the index build"}
        return
    common.log("(b) building the global HNSW index")
    build_settings = {
        "maintenance_work_mem": f"'{args.maintenance_work_mem}'",
        "max_parallel_maintenance_workers": args.build_workers,
    }
    load_before = load_avg()
    build = build_index(
        conn,
        f"CREATE INDEX {HNSW} ON memories_memory USING hnsw (embedding vector_cosine_ops) "
        f"WITH (m = {args.m}, ef_construction = {args.ef_construction})",
        seconds_left=deadline - time.monotonic() - 60,
        settings=build_settings,
    )
    hnsw: dict[str, Any] = {"build": {**build, "load_average_before": load_before,
                                      "load_average_after": load_avg()}}  # fmt: skip
    result["hnsw"] = hnsw
    if not build["built"]:
        return
    conn.execute("ANALYZE memories_memory")
    hnsw["build"]["index_mb"] = relation_mb(conn, HNSW)
    hnsw["build"]["rows_per_s"] = round(layout.rows / build["seconds"])
    common.log(f"built in {build['seconds']} s, {hnsw['build']['index_mb']} MB")
    hnsw["plans_chosen"] = {}
    for mode in ("off", "relaxed_order"):
        with settings_set(conn, hnsw__iterative_scan=mode, hnsw__ef_search=40):
            hnsw["plans_chosen"][f"iterative_scan={mode}, ef_search=40"] = {
                "big_user": plan(conn, ANN_SQL, big[0]),
                "small_user": plan(conn, ANN_SQL, small[0]),
                "small_user_selector_sql": plan(conn, EXACT_SQL, small[0]),
            }
    hnsw["runs"] = []
    configs = [("off", args.ef_search[0])] + [("relaxed_order", ef) for ef in args.ef_search]
    for mode, ef in configs:
        if time.monotonic() > deadline:
            hnsw["runs"].append({"stopped": "time budget spent"})
            break
        with settings_set(conn, hnsw__iterative_scan=mode, hnsw__ef_search=ef):
            run: dict[str, Any] = {"iterative_scan": mode, "ef_search": ef}
            big_plan = plan(conn, ANN_SQL, big[0])
            run["big_user"] = {
                **run_queries(conn, ANN_SQL, big),
                "plan_indexes": big_plan["indexes"],
            }
            if HNSW not in big_plan["indexes"]:
                with settings_set(conn, enable_seqscan="off"):
                    run["big_user_hnsw_forced"] = run_queries(
                        conn, ANN_FORCED_SQL, big, forced=True
                    )
            small_plan = plan(conn, ANN_SQL, small[0])
            run["small_user"] = {
                **run_queries(conn, ANN_SQL, small),
                "plan_indexes": small_plan["indexes"],
            }
            hnsw["runs"].append(run)
            common.log(f"{mode} ef={ef}: big {run['big_user']['latency']['p50_ms']} ms "
                       f"recall {run['big_user'][f'recall@{K}']}")  # fmt: skip

    conn.execute(f"DROP INDEX {HNSW}")
    if not args.no_partial and time.monotonic() < deadline:
        partial_one_user(args, conn, big=big, big_user=big_user, deadline=deadline, result=result)
    if time.monotonic() < deadline:
        result["shipped"] = shipped(
            conn, big=big, small=small, deadline=deadline, ef_searches=args.ef_search
        )


def partial_one_user(
    args: argparse.Namespace, conn: Any, *, big: list[Query], big_user: Any, deadline: float,
    result: dict,
) -> None:  # fmt: skip
    common.log("(c) a partial HNSW index on the big user alone (for comparison)")
    build_settings = {
        "maintenance_work_mem": f"'{args.maintenance_work_mem}'",
        "max_parallel_maintenance_workers": args.build_workers,
    }
    partial = build_index(
        conn,
        f"CREATE INDEX {PARTIAL_HNSW} ON memories_memory USING hnsw (embedding vector_cosine_ops)"
        f" WITH (m = {args.m}, ef_construction = {args.ef_construction})"
        f" WHERE user_id = '{big_user}'",
        seconds_left=deadline - time.monotonic() - 30,
        settings=build_settings,
    )
    result["partial_hnsw_one_user"] = partial
    if not partial["built"]:
        return
    partial["index_mb"] = relation_mb(conn, PARTIAL_HNSW)
    partial["runs"] = []
    for ef in args.ef_search[:2]:
        with settings_set(conn, hnsw__ef_search=ef):
            partial["runs"].append(
                {"ef_search": ef, **run_queries(conn, ANN_SQL, big),
                 "plan_indexes": plan(conn, ANN_SQL, big[0])["indexes"]}
            )  # fmt: skip
    conn.execute(f"DROP INDEX {PARTIAL_HNSW}")


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: small users exact whatever the index; the big user's recall@10 and
    p50 met by today's exact scan, or else the first ef_search (iterative scan on) that meets
    both."""
    recall, p50 = TARGETS["big_user_recall_at_10"], TARGETS["p50_ms"]
    key = f"recall@{K}"

    def meets(figures: dict[str, Any]) -> bool:
        return figures[key] >= recall and figures["latency"]["p50_ms"] <= p50

    runs = [r for r in result.get("hnsw", {}).get("runs", []) if "big_user" in r]
    small = [result["exact_scan"]["small_user"]] if "exact_scan" in result else []
    small += [r["small_user"] for r in runs]
    exact_big = result.get("exact_scan", {}).get("big_user")
    first = next((r for r in runs if r["iterative_scan"] != "off" and meets(r["big_user"])), None)
    shipped_big = result.get("shipped", {}).get("big_user")
    if "shipped" in result:
        small.append(result["shipped"]["small_user"])
    return {
        "shipped_big_user": bool(shipped_big) and meets(shipped_big),
        "small_user_exact_everywhere": bool(small)
        and all(s["queries_with_all_true_top_k"] == 1.0 for s in small),
        "big_user_by_exact_scan": bool(exact_big) and meets(exact_big),
        "big_user_by_hnsw_first_ef_search": first["ef_search"] if first else None,
    }


def drop_database(bench: common.BenchEnv) -> None:
    import psycopg
    from django.db import connections

    connections.close_all()
    maintenance = common._with_path(bench.database_url, "/postgres", keep_query=False)
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{common.BENCH_DATABASE}" WITH (FORCE)')
    common.log(f"dropped {common.BENCH_DATABASE}")


if __name__ == "__main__":
    common.run_main("search_million", main)
