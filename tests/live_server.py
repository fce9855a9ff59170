"""A real uvicorn server for tests: the project's ASGI app, in a thread of the test process.

In-process on purpose: the server sees the test's settings (overrides included) and its test
database. Tests that use it need `@pytest.mark.django_db(transaction=True)`, so that what they
write is committed and visible to the server's own connections.

    with uvicorn_live_server() as base_url:
        httpx.get(f"{base_url}/healthz")
"""

from __future__ import annotations

import gc
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def uvicorn_live_server(
    *, startup_timeout: float = 10.0, shutdown_timeout: float = 10.0, port: int = 0
) -> Iterator[str]:
    """Serve `memoryproject.asgi:application` on a free loopback port (or `port`: a server
    started again where an earlier one was, as a restart looks to its clients); yield its base
    URL.

    On exit the server stops (open streams are cut after a short grace period) and its thread is
    joined, so nothing it started outlives the block.
    """
    from memoryproject.asgi import application

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        application,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="live-server", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the live server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=shutdown_timeout)
        sock.close()
        # Django's database connections live in the server's (now finished) threads; they sit in
        # reference cycles, so collect them now rather than when the test database is dropped.
        gc.collect()
        if thread.is_alive():
            raise RuntimeError("the live server did not stop")
