"""`enrich expand`: the attribute labels nearest to a search term, for keyword expansion.

The vocabulary is the tagger's labels and the distinct product attributes stored in Postgres,
or a file of labels. Term and labels are compared by the cosine of their phrase vectors
(`TextEmbedder.phrase_vectors`: per token the sum of the encoder's last four layers, averaged
over the phrase), so "denim" finds "jeans" and "handbag" finds "purse". The vocabulary's
vectors are computed on each run: a second or two for a few hundred labels on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import psycopg
import structlog
import typer

from handlers.base import ModelLoadError
from handlers.tagging import CONFIG_FILE, TaggerConfig
from schemas.settings import Settings

log = structlog.get_logger(__name__)


class PhraseEncoder(Protocol):
    """What expansion needs of an embedder (handlers.embedding.TextEmbedder)."""

    model_id: str

    def phrase_vectors(self, phrases: Sequence[str]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True)
class Expansion:
    label: str
    similarity: float


def expand(encoder: PhraseEncoder, term: str, labels: Sequence[str], *, k: int) -> list[Expansion]:
    """The k labels nearest to `term` by cosine of phrase vectors, nearest first.

    The term itself (in any letter case) is left out of the answer; ties keep the
    vocabulary's order. An empty term is a ValueError.
    """
    term = clean_term(term)
    candidates = [label for label in labels if label.casefold() != term.casefold()]
    if not candidates or k < 1:
        return []

    vectors = encoder.phrase_vectors([term, *candidates])
    similarity = vectors[1:] @ vectors[0]
    nearest = np.argsort(-similarity, kind="stable")[:k]

    return [Expansion(candidates[i], round(float(similarity[i]), 4)) for i in nearest]


def clean_term(term: str) -> str:
    """The term with whitespace runs as one space; an empty term is a ValueError."""
    cleaned = " ".join(term.split())
    if not cleaned:
        raise ValueError("the term is empty; give a word or phrase to expand, e.g. 'denim'")
    return cleaned


def read_vocabulary(path: Path) -> list[str]:
    """Labels from a text file, one a line; blank lines are skipped, repeats kept once."""
    return unique_labels(path.read_text(encoding="utf-8").splitlines())


def catalog_vocabulary(settings: Settings) -> list[str]:
    """The tagger's labels, then the distinct attributes of the stored products.

    A source that cannot be read (no tagger.json, no database answering at
    ENRICH_DATABASE_URL) is logged as a WARNING and left out; the other still counts.
    """
    labels: list[str] = []
    try:
        labels += TaggerConfig.read(settings.models.tagger_dir / CONFIG_FILE).labels
    except ModelLoadError as error:
        log.warning("vocabulary_source_skipped", source="tagger", reason=str(error)[:300])

    try:
        labels += stored_attributes(settings.database_url.get_secret_value())
    except psycopg.Error as error:
        log.warning("vocabulary_source_skipped", source="database", reason=str(error)[:300])

    return unique_labels(labels)


def stored_attributes(database_url: str) -> list[str]:
    """Distinct values of `products.attributes`, in alphabetical order."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT DISTINCT attribute FROM products, unnest(attributes) AS attribute"
            " ORDER BY attribute"
        ).fetchall()
    return [str(row[0]) for row in rows]


def unique_labels(labels: Iterable[str]) -> list[str]:
    """Labels with whitespace runs as one space, empty ones out, each kept once (first spelling
    of those that differ only in letter case)."""
    seen: set[str] = set()
    unique = []
    for label in (" ".join(raw.split()) for raw in labels):
        if label and label.casefold() not in seen:
            seen.add(label.casefold())
            unique.append(label)
    return unique


def print_expansions(
    settings: Settings, term: str, *, k: int, vocabulary_file: Path | None, as_json: bool
) -> int:
    """Print the labels nearest to `term` as a table or as JSON; returns the exit code."""
    from handlers.embedding import TextEmbedder

    try:
        term = clean_term(term)
    except ValueError as error:
        typer.echo(str(error), err=True)
        return 2

    try:
        labels = (
            catalog_vocabulary(settings)
            if vocabulary_file is None
            else read_vocabulary(vocabulary_file)
        )
    except (OSError, UnicodeDecodeError) as error:
        typer.echo(f"cannot read the vocabulary file {vocabulary_file}: {error}", err=True)
        return 2
    if not labels:
        typer.echo("the vocabulary is empty: no labels to expand the term into", err=True)
        return 1

    encoder = TextEmbedder.from_settings(settings.models)
    expansions = expand(encoder, term, labels, k=k)

    if as_json:
        document = {
            "term": term,
            "model_id": encoder.model_id,
            "vocabulary_size": len(labels),
            "expansions": [asdict(expansion) for expansion in expansions],
        }
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
        return 0

    for expansion in expansions:
        typer.echo(f"{expansion.label:<32} {expansion.similarity:.4f}")
    typer.echo(f"{len(expansions)} of {len(labels)} labels, nearest to {term!r} first")
    return 0
