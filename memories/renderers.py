"""The API's JSON renderer: DRF's, able to write a body that holds a lone surrogate."""

from __future__ import annotations

from typing import Any

from rest_framework import renderers


class JSONRenderer(renderers.JSONRenderer):
    """UTF-8 JSON as DRF writes it; a body holding a lone surrogate (an error message that
    quotes the bad input, say), which has no UTF-8 form, goes out with non-ASCII escaped."""

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        try:
            return super().render(data, accepted_media_type, renderer_context)
        except UnicodeEncodeError:  # DRF's would answer a 500
            return _AsciiJSONRenderer().render(data, accepted_media_type, renderer_context)


class _AsciiJSONRenderer(renderers.JSONRenderer):
    ensure_ascii = True
