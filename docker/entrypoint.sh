#!/bin/sh
# web | worker | beat | migrate | any command
set -e
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
    exec celery -A memoryproject worker -Q "${WORKER_QUEUES:-high,default,batch}" \
      --concurrency "${WORKER_CONCURRENCY:-2}" --pool "${WORKER_POOL:-prefork}" --loglevel INFO ;;
  beat)
    exec celery -A memoryproject beat --loglevel INFO --schedule /tmp/celerybeat-schedule ;;
  migrate)
    exec python manage.py migrate --noinput ;;
  *)
    exec "$@" ;;
esac
