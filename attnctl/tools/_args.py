"""Argument checks shared by the tools."""
from __future__ import annotations

import math
from typing import Optional


def finite(value, name: str, allow_none: bool = False) -> Optional[float]:
    """``value`` as a float; a clear error unless it is a finite number (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number{' or None' if allow_none else ''}, got {value!r}")
    return float(value)
