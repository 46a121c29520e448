"""JSON Schema files generated from the event models, for services in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.events import EnrichmentCompleted, ProductCreated, ProductDeleted

SCHEMA_DIR = Path(__file__).resolve().parent

SCHEMA_FILES: dict[str, type[BaseModel]] = {
    "product_created.v1.schema.json": ProductCreated,
    "enrichment_completed.v1.schema.json": EnrichmentCompleted,
    "product_deleted.v1.schema.json": ProductDeleted,
}


def render_schema(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(
        mode="serialization" if model is EnrichmentCompleted else "validation"
    )
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(folder: Path = SCHEMA_DIR) -> list[Path]:
    written = []
    for name, model in SCHEMA_FILES.items():
        path = folder / name
        path.write_text(render_schema(model))
        written.append(path)
    return written
