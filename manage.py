#!/usr/bin/env python
"""Django's command line. A development entry point: with no DATABASE_URL / REDIS_URL it starts
(or reuses) the embedded PostgreSQL and Redis first, as `make run` does."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memoryproject.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    from memoryproject.embedded import (
        EmbeddedServerError,
        use_development_secret_key,
        use_embedded_servers,
    )

    use_development_secret_key(os.environ)
    try:
        use_embedded_servers(os.environ)
    except EmbeddedServerError as exc:
        print(f"manage.py: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        from django.conf import settings

        settings.INSTALLED_APPS  # noqa: B018 - reads the settings now, to report a bad value
    except ImproperlyConfigured as exc:
        print(f"manage.py: {exc}", file=sys.stderr)
        sys.exit(2)
    execute_from_command_line(sys.argv)
