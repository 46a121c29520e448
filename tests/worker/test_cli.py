from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker import cli
from worker.cli import app
from worker.local import LocalStack

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
        ["bench", "precision"],
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


def _enrich(*arguments: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """The installed `enrich` in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *arguments],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("arguments", "environment", "named"),
    [
        (
            ["migrate"],
            {"ENRICH_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"},
            "ENRICH_DATABASE_URL",
        ),
        (["migrate"], {"ENRICH_DATABASE_URL": "notaurl"}, "ENRICH_DATABASE_URL"),
        (
            ["dlq", "list"],
            {"ENRICH_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"},
            "ENRICH_BROKER_URL",
        ),
        (
            ["migrate"],
            {"ENRICH_IMAGES__HTTPS_HOSTS": "images.shop.example"},
            "ENRICH_IMAGES__HTTPS_HOSTS='images.shop.example' (list settings take JSON",
        ),
        (
            ["dlq", "list"],
            {"ENRICH_BATCH__FULL_PRECISION_STAGES": '["bogus"]'},
            "ENRICH_BATCH__FULL_PRECISION_STAGES received 'bogus'; allowed: ",
        ),
        (
            ["worker"],
            {"ENRICH_BATCH__TASK_TIME_LIMIT_S": "-1"},
            "ENRICH_BATCH__TASK_TIME_LIMIT_S received '-1'",
        ),
        (
            ["dlq", "list"],
            {"ENRICH_BATCH__TASK_TIME_LIMIT_S": "1700"},
            "ENRICH_BATCH__CONSUMER_TIMEOUT_S",
        ),
    ],
)
def test_a_bad_setting_is_told_in_one_line_that_names_it(
    arguments: list[str], environment: dict[str, str], named: str
) -> None:
    finished = _enrich(*arguments, **environment)

    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    (line,) = [line for line in finished.stderr.splitlines() if line.startswith("enrich: ")]
    assert named in line


def test_dlq_replay_refuses_a_kind_no_message_is_parked_under() -> None:
    result = runner.invoke(app, ["dlq", "replay", "--reason", "invalid_events"])

    assert result.exit_code == 2
    assert "invalid_event" in result.output
    assert "abandoned_backfill_chunk" in result.output


def test_a_database_that_answers_with_a_refusal_is_told_apart_from_one_that_does_not_answer(
    stack: LocalStack,
) -> None:
    url = stack.settings.database_url.get_secret_value().rsplit("/", 1)[0] + "/no_such_database"

    finished = _enrich("migrate", ENRICH_DATABASE_URL=url)

    assert finished.returncode == 2
    assert "ENRICH_DATABASE_URL refused the connection" in finished.stderr
    assert "no_such_database" in finished.stderr


def test_the_demo_without_a_broker_names_its_url_without_the_password() -> None:
    finished = _enrich("demo", ENRICH_BROKER_URL="amqp://guest:s3cret@127.0.0.1:1//")

    assert finished.returncode == 2
    assert "amqp://guest:**@127.0.0.1:1//" in finished.stderr
    assert "s3cret" not in finished.stderr


def test_bench_subcommands_run_where_no_datasets_lie_beside_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "DEFAULT_CCP", tmp_path / "shared" / "datasets" / "ccp")

    subcommand = runner.invoke(app, ["bench", "stages", "--help"])
    whole = runner.invoke(app, ["bench", "--json"])

    assert subcommand.exit_code == 0, subcommand.output
    assert whole.exit_code == 2
    assert "is not a directory" in whole.output
