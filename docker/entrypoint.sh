#!/bin/sh
# web | worker | beat | migrate | any command
set -e

# A wrong value stops the container with one line naming the variable and the allowed values.
fail() { echo "entrypoint: $1" >&2; exit 2; }
check_count() {  # name value
  case "$2" in
    ''|*[!0-9]*|0) fail "$1 must be a whole number from 1 to 10000; got '$2'" ;;
  esac
  [ "$2" -le 10000 ] || fail "$1 must be a whole number from 1 to 10000; got '$2'"
}

if [ -n "$PROMETHEUS_MULTIPROC_DIR" ]; then
  # This container's metric files from an earlier life (same hostname): a restarted process
  # would read its old gauges back from them.
  rm -f "$PROMETHEUS_MULTIPROC_DIR"/*_"$(hostname | tr _ -)"@*.db
fi
case "$1" in
  web)
    python manage.py migrate --noinput
    exec uvicorn memoryproject.asgi:application --host 0.0.0.0 --port "${PORT:-8000}" ;;
  worker)
    pool="${WORKER_POOL:-threads}"
    case "$pool" in
      prefork|threads|solo) ;;
      *) fail "WORKER_POOL must be one of prefork, threads, solo; got '$pool'" ;;
    esac
    concurrency="${WORKER_CONCURRENCY:-64}"
    check_count WORKER_CONCURRENCY "$concurrency"
    # Refused when the embedder's dimension is not the stored vectors' (web's migrate checks it).
    python manage.py check --database default
    exec celery -A memoryproject worker -Q "${WORKER_QUEUES:-high,default,batch}" \
      --concurrency "$concurrency" --pool "$pool" --loglevel INFO ;;
  beat)
    exec celery -A memoryproject beat --loglevel INFO --schedule /tmp/celerybeat-schedule ;;
  migrate)
    exec python manage.py migrate --noinput ;;
  *)
    exec "$@" ;;
esac
