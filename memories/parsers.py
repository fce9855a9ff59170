"""JSON from clients, read strictly: DRF's parser and the JSON in query parameters, closed to
what got through them into a 500."""

from __future__ import annotations

import codecs
import math
from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser, get_encoding  # type: ignore[attr-defined]  # not in the stub
from rest_framework.utils import json


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 is valid JSON but parses as inf, which neither a JSON answer nor jsonb can hold.
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def strict_loads(text: str | bytes) -> Any:
    """json.loads refusing, as ValueError, what no column can hold: NaN, Infinity and numbers
    beyond a double's range, and nesting deep enough to exhaust the decoder's stack."""
    try:
        # DRF's loads (NaN and Infinity refused); its stub says str, but like json.loads it reads
        # bytes too, guessing UTF-8/16/32 as the JSON standard says.
        return json.loads(text, parse_float=_finite_float)  # type: ignore[arg-type]
    except RecursionError:
        raise ValueError("nested too deeply") from None


class StrictJSONParser(JSONParser):
    """DRF's JSON parser reading with `strict_loads`, whatever STRICT_JSON says."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        # DRF's charset choice: the request's, refusing codecs that are not text encodings.
        reader = codecs.getreader(get_encoding(parser_context or {}))(stream)
        try:
            return strict_loads(reader.read())
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
