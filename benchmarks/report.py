"""The benchmarks' last line: one strict JSON object (NaN and infinity become null)."""

from __future__ import annotations

import json
import math
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def json_line(figures: dict[str, Any]) -> str:
    return json.dumps(_clean(figures), allow_nan=False)
