"""Text made from the node's local time of a second, once per second.

A busy node dates many messages and records many attempts in the same second:
each second's text is made once. The cache is keyed by the time zone too
(``time.tzset`` may change it): by its names and its offsets, since zones of
the same names may differ in offset.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def once_a_second(make: Callable[[time.struct_time], T]) -> Callable[[float], T]:
    """``make`` of the local time of a moment (seconds since the epoch, its
    fraction dropped, as ``time.localtime`` drops it), made once per second
    and time zone."""

    @functools.lru_cache(maxsize=4)
    def of_second(second: int, zone: tuple[tuple[str, str], int, int]) -> T:
        return make(time.localtime(second))

    def at(when: float) -> T:
        return of_second(math.floor(when), (time.tzname, time.timezone, time.altzone))

    return at
