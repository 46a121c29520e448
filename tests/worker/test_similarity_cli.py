"""`enrich similar`: arguments, the table and --json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from schemas.queries import SimilarityQuery, Space
from tests.worker.catalog import add_products, catalog_database, random_embeddings
from worker.cli import app
from worker.local import LocalStack
from worker.similarity_cli import print_similar
from worker.stores import database

runner = CliRunner()


def test_similar_needs_either_a_product_or_a_text() -> None:
    result = runner.invoke(app, ["similar"])

    assert result.exit_code == 2
    assert "either PRODUCT_ID or --text" in result.output


def test_similar_prints_json_with_the_model_version(
    stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    embeddings = random_embeddings(20, 8, seed=3)
    embeddings["p-0001"] = embeddings["p-0000"] + np.float32(0.01)

    with catalog_database(stack) as url:
        with database.connect(url) as conn:
            add_products(conn, "cli@1", embeddings, attributes={"p-0001": ["blue"]})
        settings = stack.settings.model_copy(update={"database_url": SecretStr(url)})
        code = print_similar(settings, SimilarityQuery(k=3), "p-0000", None, as_json=True)

    out = capsys.readouterr().out
    body = json.loads(out[out.index("{\n") :])  # after the migration's log lines
    assert code == 0
    assert body["model_version"] == "cli@1"
    assert [r["product_id"] for r in body["results"]][:1] == ["p-0001"]
    assert len(body["results"]) == 3


def test_similar_to_an_unknown_product_exits_1(
    stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = stack.settings

    code = print_similar(settings, SimilarityQuery(), "p-unknown", None, as_json=False)

    assert code == 1
    assert "p-unknown" in capsys.readouterr().err


def test_similar_refuses_an_unknown_space() -> None:
    result = runner.invoke(app, ["similar", "p-0000", "--space", "audio"])

    assert result.exit_code == 2
    assert "--space must be one of text, image" in result.output


def test_similar_in_the_image_space_prints_that_space(
    stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    images = random_embeddings(10, 6, seed=4)
    images["p-0002"] = images["p-0000"] + np.float32(0.01)
    query = SimilarityQuery(k=2, space=Space.IMAGE)

    with catalog_database(stack) as url:
        with database.connect(url) as conn:
            add_products(conn, "cli@1", random_embeddings(10, 8, seed=3))
            add_products(conn, "tagger@1+avgpool", images, space="image")
        settings = stack.settings.model_copy(update={"database_url": SecretStr(url)})
        code = print_similar(settings, query, "p-0000", None, as_json=False)

    out = capsys.readouterr().out
    assert code == 0
    assert "2 products in the image space, model version tagger@1+avgpool" in out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("p-")]
    assert rows[:1] == ["p-0002"]
