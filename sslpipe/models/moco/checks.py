"""Argument checks shared by the MoCo modules."""

from __future__ import annotations


def check_positive_int(value: int, name: str) -> None:
    """Raise ValueError unless ``value`` is an int >= 1 (a bool is refused); ``name`` says which."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}. Pass an int >= 1.")
