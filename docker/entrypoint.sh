#!/bin/sh
# The image's processes, as `make run` starts them (memoryproject/run.py), one per container:
#   migrate             apply the migrations and exit: run it first, once (compose.yaml's
#                       `migrate` service), never from every replica of web at once
#   web                 the ASGI app on uvicorn (PORT, default 8000)
#   worker LANE         a Celery worker on one lane: high, default or batch, with that lane's pool
#                       and concurrency (the same settings as `make run`)
#   beat                Celery beat: the sweeper, the event relay, trims and housekeeping
#   consumers           the event stream's consumer groups (audit, analytics, webhooks)
#   anything else       run as given (`manage.py createapikey --tenant demo`, a shell...)
set -e

# A wrong value stops the container with one line naming the variable and the allowed values.
fail() { echo "entrypoint: $1" >&2; exit 2; }
check_pool() {  # name value
  case "$2" in
    prefork|threads|solo) ;;
    *) fail "$1 must be one of prefork, threads, solo; got '$2'" ;;
  esac
}
check_count() {  # name value
  case "$2" in
    ''|*[!0-9]*) fail "$1 must be a whole number from 1 to 10000; got '$2'" ;;
  esac
  [ "$2" -ge 1 ] && [ "$2" -le 10000 ] || fail "$1 must be a whole number from 1 to 10000; got '$2'"
}

if [ -n "$PROMETHEUS_MULTIPROC_DIR" ]; then
  # This container's metric files from an earlier life (same hostname): a restarted process
  # would read its old gauges back from them. Other containers' files are theirs.
  rm -f "$PROMETHEUS_MULTIPROC_DIR"/*_"$(hostname | tr _ -)"@*.db
fi

case "$1" in
  web)
    exec uvicorn memoryproject.asgi:application --host 0.0.0.0 --port "${PORT:-8000}" \
      --no-access-log ;;
  worker)
    lane="$2"
    # Each lane's pool and concurrency, under the names and defaults of `make run`: the LLM
    # lanes wait on the network (many jobs in one process, threads), batch is CPU (prefork).
    case "$lane" in
      high) pool="${WORKER_POOL:-threads}"; pool_name=WORKER_POOL
        concurrency="${HIGH_WORKER_CONCURRENCY:-16}"; concurrency_name=HIGH_WORKER_CONCURRENCY ;;
      default) pool="${WORKER_POOL:-threads}"; pool_name=WORKER_POOL
        concurrency="${WORKER_CONCURRENCY:-64}"; concurrency_name=WORKER_CONCURRENCY ;;
      batch) pool="${BATCH_WORKER_POOL:-prefork}"; pool_name=BATCH_WORKER_POOL
        concurrency="${BATCH_WORKER_CONCURRENCY:-1}"; concurrency_name=BATCH_WORKER_CONCURRENCY ;;
      *) fail "worker wants a lane: high, default or batch; got '$lane'" ;;
    esac
    check_pool "$pool_name" "$pool"
    check_count "$concurrency_name" "$concurrency"
    # Refused when the embedder's dimension is not the stored vectors' (web's migrate checks it).
    python manage.py check --database default
    exec celery -A memoryproject worker -n "$lane@%h" -Q "$lane" \
      --pool "$pool" --concurrency "$concurrency" --loglevel INFO ;;
  beat)
    # The schedule file goes to MEMORY_VAR_DIR (settings.CELERY_BEAT_SCHEDULE_FILENAME).
    exec celery -A memoryproject beat --loglevel INFO ;;
  consumers)
    exec python manage.py consume_events ;;
  migrate)
    exec python manage.py migrate --noinput ;;
  *)
    exec "$@" ;;
esac
