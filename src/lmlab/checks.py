"""What a user-given value is: the type tests every check on configs and arguments shares.

YAML and Hydra hand over `True` where an integer was meant (`bool` is an `int`
in Python), and NumPy or torch scalars where a plain number was: these tests
accept any integral or real number and refuse booleans, so `seed=true` or
`top_k=yes` is an error, not 1.
"""

from __future__ import annotations

import math
import numbers


def is_int(value: object) -> bool:
    """An integer (Python, NumPy or torch), not a boolean."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (integers included), not a boolean; may be inf or nan."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number, not a boolean."""
    return is_real(value) and math.isfinite(value)


def is_positive_int(value: object) -> bool:
    return is_int(value) and value >= 1
