"""The ASGI application `make run` serves: Server-Sent Events on Django's ASGI handler, every
other request on Django's WSGI handler in a fixed pool of threads.

Why two handlers: a sync view under Django's ASGI handler costs a new thread per request (asgiref
gives every request its own single-thread executor) plus a thread hop for each request signal,
about 2 ms of CPU a request here; the same view through a2wsgi's thread pool costs a tenth of
that. The event stream stays on ASGI, where a waiting client holds no thread of the pool.
"""

import gc
import os
from typing import Any

from a2wsgi import WSGIMiddleware
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")

STREAMING_PATHS = frozenset({"/v1/stream"})

_asgi_app = get_asgi_application()
_wsgi_app = WSGIMiddleware(get_wsgi_application(), workers=settings.WEB_THREADS)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] not in STREAMING_PATHS:
        await _wsgi_app(scope, receive, send)
    else:
        await _asgi_app(scope, receive, send)


# Everything loaded so far lives as long as the process: keep it out of the collector's full
# passes, which otherwise pause every open event stream for tens of milliseconds.
gc.freeze()
