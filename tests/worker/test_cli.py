from __future__ import annotations

import pytest
from typer.testing import CliRunner

from worker.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        ["worker"],
        ["publish"],
        ["migrate"],
        ["demo"],
        ["show"],
        ["schemas"],
        ["train", "segmenter"],
        ["train", "tagger"],
        ["eval"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["similar"],
        ["serve"],
        ["expand"],
        ["backfill"],
        ["status"],
        ["bench"],
        ["bench", "similarity"],
    ],
)
def test_every_command_explains_itself_with_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])

    assert result.exit_code == 0
    assert "Usage" in result.output


def test_schema_files_pass_the_staleness_check() -> None:
    result = runner.invoke(app, ["schemas", "--check"])

    assert result.exit_code == 0, result.output


def test_the_worker_refuses_to_start_without_its_model_folders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from schemas.settings import get_settings

    monkeypatch.setenv("ENRICH_MODELS__TAGGER_DIR", "/nonexistent/tagger")
    get_settings.cache_clear()

    result = runner.invoke(app, ["worker"])
    get_settings.cache_clear()

    assert result.exit_code == 2
    assert "ENRICH_MODELS__TAGGER_DIR=/nonexistent/tagger" in result.output
