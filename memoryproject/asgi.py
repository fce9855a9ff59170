"""The ASGI app: Django, with `GET /v1/stream` (Server-Sent Events) served in front of it.

The stream is a plain ASGI app (`memories.events.sse.stream_app`) rather than a Django view:
through Django every chunk sent to every subscriber costs the handler's work again, and every open
stream holds a thread. Everything else goes to Django.
"""

import gc
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")

django_application = get_asgi_application()

from memories.events.sse import ASGIReceive, ASGISend, stream_app  # noqa: E402 (needs setup)

STREAM_PATH = "/v1/stream"


async def application(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    if scope["type"] == "http" and scope["path"] == STREAM_PATH:
        await stream_app(scope, receive, send)
    else:
        await django_application(scope, receive, send)


# Everything loaded so far lives as long as the process: keep it out of the collector's full
# passes, which otherwise pause every open event stream for tens of milliseconds.
gc.freeze()
# Handing one event to N open streams keeps a few objects per stream alive until each has sent.
# At Python's default of 700 the collector ran several times per event with 1,000 streams, and
# what it saw moved to older generations, whose passes took 10-70 ms; at 10,000 no collection ran
# at all in a 100-event round (bench/sse_fanout.py).
gc.set_threshold(10_000, 10, 10)
