"""The API's JSON body parser: DRF's, closed to two bodies that got through it into a 500."""

from __future__ import annotations

import codecs
import math
from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser, get_encoding
from rest_framework.utils import json


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 is valid JSON but parses as inf, which neither a JSON answer nor jsonb can hold.
        raise ValueError(f"number out of range: {text[:40]}")
    return value


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, refusing with a 400 (a ParseError) what it let through: numbers beyond
    a double's range, and nesting deep enough to exhaust the decoder's stack (RecursionError).
    Always strict, whatever STRICT_JSON says: NaN and Infinity are refused too."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            # DRF's charset choice: the request's, refusing codecs that are not text encodings.
            decoded = codecs.getreader(get_encoding(parser_context or {}))(stream)
            return json.load(decoded, parse_float=_finite_float)  # strict: no NaN or Infinity
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None
