"""The domains of the numbers users write: a value outside one is refused when its file is read.

Configs and recipes declare every number with one of these, so a nonsense value (a batch size of 0,
a negative learning rate, `true` for a step count) is a one-line error naming the field before any
model loads. Integers are strict (`true` or `2.5` is not a count); floats are finite.
tests/test_domains.py fails for a numeric field declared without a domain.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]  # 0 .. 1, both included
OpenFraction = Annotated[float, Field(strict=True, ge=0, lt=1, allow_inf_nan=False)]  # 0 .. 1, 1 excluded
# a layer index, negative from the end; whether it exists is checked against each model's depth
LayerIndex = Annotated[int, Field(strict=True, ge=-4096, le=4095)]
