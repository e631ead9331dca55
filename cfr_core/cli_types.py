"""Click parameter types shared by the CLI modules."""

from __future__ import annotations

import math

import click


class FiniteFloatRange(click.FloatRange):
    """A float range that refuses NaN and infinity (``float("nan")`` passes every
    comparison test as False, so a plain range would let it through and silently
    switch a check off)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class FiniteFloat(FiniteFloatRange):
    """Any finite float."""

    name = "float"

    def __init__(self) -> None:
        super().__init__()
