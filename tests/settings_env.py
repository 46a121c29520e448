"""Every `ENRICH_*` variable that schemas.settings reads, with its default as the docs show it."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from schemas.settings import REPO_ROOT, Settings


def enrich_variables() -> dict[str, str]:
    """`ENRICH_NAME` (nested: `ENRICH_S3__ENDPOINT_URL`) to its default, as text."""
    return dict(_walk(Settings, "ENRICH_"))


def _walk(model: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
    found = []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            found += _walk(type(default), f"{prefix}{name.upper()}__")
        else:
            found.append((f"{prefix}{name.upper()}", default_text(default)))
    return found


def default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value.relative_to(REPO_ROOT)) if value.is_relative_to(REPO_ROOT) else str(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return json.dumps([str(item) for item in value])  # list settings are JSON
    return str(value)
