"""`enrich similar`: one query from the command line, as a table or as JSON."""

from __future__ import annotations

import typer

from schemas.queries import SimilarityQuery, SimilarityResults
from schemas.settings import Settings
from worker import similarity
from worker.stores import database


def print_similar(
    settings: Settings,
    query: SimilarityQuery,
    product_id: str | None,
    text: str | None,
    *,
    as_json: bool,
) -> int:
    """Print the products similar to a product or a text; returns the exit code."""
    try:
        found = _query(settings, query, product_id, text)
    except (similarity.SimilarityNotFound, ValueError) as error:
        typer.echo(str(error), err=True)
        return 1

    results = SimilarityResults(
        model_version=found[0].model_version if found else None,
        space=query.space,
        results=found,
    )
    if as_json:
        typer.echo(results.model_dump_json(indent=2))
        return 0

    for item in found:
        typer.echo(f"{item.product_id:<24} {item.distance:.4f}  {item.title[:60]}")
    typer.echo(
        f"{len(found)} products in the {results.space} space, model version {results.model_version}"
    )
    return 0


def _query(
    settings: Settings, query: SimilarityQuery, product_id: str | None, text: str | None
) -> list[similarity.SimilarProduct]:
    with database.connect(settings.database_url.get_secret_value()) as conn:
        if product_id is not None:
            return similarity.similar_to_product(conn, product_id, query)

        assert text is not None
        return similarity.similar_to_text(conn, similarity.load_text_encoder(settings), text, query)
