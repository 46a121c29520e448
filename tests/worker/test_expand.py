"""`enrich expand`: labels nearest to a search term, with the real encoder and Postgres."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs
from typer.testing import CliRunner

from handlers.embedding import TextEmbedder, default_embedding_model_dir
from handlers.tagging import CONFIG_FILE, TaggerConfig
from schemas.settings import Settings
from tests.worker.catalog import add_products, catalog_database, random_embeddings
from worker.cli import app
from worker.expand import catalog_vocabulary, expand, read_vocabulary
from worker.local import LocalStack
from worker.stores import database

runner = CliRunner()


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder(model_dir=default_embedding_model_dir(), device="cpu")


@pytest.fixture(scope="module")
def tagger_labels() -> list[str]:
    return TaggerConfig.read(Settings().models.tagger_dir / CONFIG_FILE).labels


def test_denim_expands_to_jeans_first_and_well_before_a_hat(
    embedder: TextEmbedder, tagger_labels: list[str]
) -> None:
    expansions = expand(embedder, "denim", tagger_labels, k=len(tagger_labels))

    ranked = [expansion.label for expansion in expansions]
    assert ranked[0] == "jeans"
    assert ranked.index("hat") > len(ranked) // 2
    assert expansions[0].similarity > expansions[-1].similarity


def test_a_handbag_expands_to_purse_and_bag(
    embedder: TextEmbedder, tagger_labels: list[str]
) -> None:
    expansions = expand(embedder, "handbag", tagger_labels, k=3)

    assert {"purse", "bag"} <= {expansion.label for expansion in expansions}


def test_the_term_itself_is_left_out_and_k_limits_the_answer(embedder: TextEmbedder) -> None:
    expansions = expand(embedder, " Jeans ", ["jeans", "hat", "boots", "denim jacket"], k=2)

    assert len(expansions) == 2
    assert "jeans" not in [expansion.label for expansion in expansions]


def test_an_empty_term_is_refused(embedder: TextEmbedder) -> None:
    with pytest.raises(ValueError, match="the term is empty"):
        expand(embedder, "  ", ["jeans"], k=3)


def test_a_vocabulary_file_skips_blank_lines_and_repeats(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("jeans\n\n  slim   fit \nJeans\nhat\n")

    labels = read_vocabulary(path)

    assert labels == ["jeans", "slim fit", "hat"]


def test_the_catalog_vocabulary_is_the_tagger_labels_and_the_stored_attributes(
    stack: LocalStack, tagger_labels: list[str]
) -> None:
    embeddings = random_embeddings(2, 8)
    attributes = {"p-0000": ["slim fit", "jeans"], "p-0001": ["organic cotton"]}
    with catalog_database(stack) as url:
        with database.connect(url) as conn:
            add_products(conn, "emb@1", embeddings, attributes=attributes)
        settings = stack.settings.model_copy(update={"database_url": SecretStr(url)})

        labels = catalog_vocabulary(settings)

    assert labels == [*tagger_labels, "organic cotton", "slim fit"]


def test_without_a_database_the_tagger_labels_remain_and_a_warning_says_so(
    tagger_labels: list[str],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(database_url=SecretStr(f"postgresql://postgres@127.0.0.1:{port}/x"))

    with capture_logs() as logs:
        labels = catalog_vocabulary(settings)

    assert labels == tagger_labels
    assert [(entry["event"], entry["source"]) for entry in logs] == [
        ("vocabulary_source_skipped", "database")
    ]


def test_enrich_expand_explains_itself_with_help() -> None:
    result = runner.invoke(app, ["expand", "--help"])

    assert result.exit_code == 0
    assert "--vocabulary" in result.output and "--json" in result.output


def test_enrich_expand_answers_from_a_vocabulary_file_as_json(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("hat\njeans\nwool coat\nsneakers\n")

    result = runner.invoke(app, ["expand", "denim", "--vocabulary", str(path), "-k", "2", "--json"])

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["term"] == "denim" and document["vocabulary_size"] == 4
    assert [item["label"] for item in document["expansions"]][:1] == ["jeans"]
    assert len(document["expansions"]) == 2


def test_enrich_expand_with_an_empty_vocabulary_file_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("\n\n")

    result = runner.invoke(app, ["expand", "denim", "--vocabulary", str(path)])

    assert result.exit_code == 1
    assert "the vocabulary is empty" in result.output
