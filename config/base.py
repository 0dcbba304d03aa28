"""What every config model shares: frozen, no unknown keys, no silent type conversion, one error type.

Strict typing means a YAML `yes` cannot become a device count and `"4"` is not an integer; lists are the one
exception (YAML has no tuples), through `Items`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Strict

REPO_ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")
Items = Annotated[tuple[T, ...], Strict(False)]
"""A tuple field that YAML fills with a list; its items stay strictly typed."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message is one line naming file, key and value."""


class RuleError(ValueError):
    """A cross-field rule that one key breaks, raised inside a model validator.

    `key` is the dotted path from the model whose validator raises it, so the loader can name the full path.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        super().__init__(f"{key} = {value!r}: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


class ConfigModel(BaseModel):
    """Base of every config section."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
