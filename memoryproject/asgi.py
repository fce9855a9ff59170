"""The ASGI app `make run` serves: `GET /v1/stream` (Server-Sent Events) on a plain ASGI app,
as is the staff dashboard's `GET /dashboard/stream` (dashboard.stream); every other call on
Django's WSGI handler in a fixed pool of threads.

- The stream is `memories.events.sse.stream_app` rather than a Django view: through Django every
  chunk sent to every subscriber costs the handler's work again, and every open stream holds a
  thread.
- A sync view under Django's ASGI handler costs a new thread per request (asgiref gives every
  request its own single-thread executor) and a thread hop for each request signal, about 2 ms of
  CPU a call here; through a fixed pool of threads the same view costs a tenth of that
  (`wsgi_bridge`, which also keeps each call to one hop between the loop and its thread).
"""

import gc
import os
from typing import Any

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application

from memoryproject.wsgi_bridge import ASGIReceive, ASGISend, BufferedWSGIMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")

# Only what is not HTTP (uvicorn's lifespan probe) reaches Django's ASGI handler, which declines it.
django_asgi_application = get_asgi_application()

from rest_framework.exceptions import AuthenticationFailed  # noqa: E402 (needs setup)

from dashboard.stream import dashboard_stream_app  # noqa: E402
from memories.auth import api_key_authenticate  # noqa: E402
from memories.events.sse import stream_app  # noqa: E402
from memories.request_waits import wait_for_requests  # noqa: E402


def _body_welcome(scope: dict[str, Any]) -> bool:
    """A body is read only for a call of the API with a valid key (or a call outside the API):
    without one, nothing a client sends is read before its 401."""
    if not scope["path"].startswith("/v1/"):
        return True
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    try:
        return api_key_authenticate(header) is not None
    except AuthenticationFailed:
        return False


# Calls that ask to wait for a request to finish are held here, on the loop, not in a thread.
django_wsgi_application = wait_for_requests(
    BufferedWSGIMiddleware(
        get_wsgi_application(), threads=settings.WEB_THREADS, body_welcome=_body_welcome
    )
)


STREAM_PATH = "/v1/stream"
# The staff dashboard's feed: the same stream, authorized by Django's session cookie.
DASHBOARD_STREAM_PATH = "/dashboard/stream"


async def application(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    if scope["type"] != "http":
        await django_asgi_application(scope, receive, send)
    elif scope["path"] == STREAM_PATH:
        await stream_app(scope, receive, send)
    elif scope["path"] == DASHBOARD_STREAM_PATH:
        await dashboard_stream_app(scope, receive, send)
    else:
        await django_wsgi_application(scope, receive, send)


# Everything loaded so far lives as long as the process: keep it out of the collector's full
# passes, which otherwise pause every open event stream for tens of milliseconds.
gc.freeze()
# Handing one event to N open streams keeps a few objects per stream alive until each has sent.
# At Python's default of 700 the collector ran several times per event with 1,000 streams, and
# what it saw moved to older generations, whose passes took 10-70 ms; at 10,000 no collection ran
# at all in a 100-event round (bench/sse_fanout.py).
gc.set_threshold(10_000, 10, 10)
