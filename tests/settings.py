"""The test session's settings: the service's own, on the embedded servers when DATABASE_URL /
REDIS_URL are not given (pytest-django imports this module before anything touches Django).

Parallel test processes share one embedded Redis; each gets its own database number so their
Celery queues and streams never mix (pytest-xdist names its workers gw0, gw1, ...). The first
process to start it (xdist's controller) leaves its address in MEMORY_TEST_REDIS for the workers
it starts, which inherit its environment, REDIS_URL included, and take their own number.
Processes the tests start (Celery workers, the runner) get explicit URLs and the service's own
settings module (tests/conftest.py).
"""

import os

from memoryproject.embedded import (
    ensure_redis,
    use_development_secret_key,
    use_embedded_servers,
    var_dir,
)

_xdist_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if not os.environ.get("REDIS_URL") and "MEMORY_TEST_REDIS" not in os.environ:
    os.environ["MEMORY_TEST_REDIS"] = ensure_redis(var_dir(os.environ))
if "MEMORY_TEST_REDIS" in os.environ:
    database = int(_xdist_worker[2:]) + 1 if _xdist_worker else 0
    os.environ["REDIS_URL"] = f"{os.environ['MEMORY_TEST_REDIS']}/{database}"
use_embedded_servers(os.environ)
use_development_secret_key(os.environ)

from memoryproject.settings import *  # noqa: E402, F403
