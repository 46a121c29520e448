"""docs/configuration.md: every ENRICH_ setting with its default, and Celery's as configured."""

from __future__ import annotations

import ast
import re

import celeryconfig
from schemas.settings import REPO_ROOT
from tests.settings_env import enrich_variables

PAGE = (REPO_ROOT / "docs" / "configuration.md").read_text()


def table_rows() -> dict[str, list[str]]:
    """First cell (without backticks) to the row's cells, for every table row of the page."""
    rows = {}
    for line in PAGE.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_enrich_setting_has_a_row_with_its_default() -> None:
    rows = table_rows()

    for name, default in enrich_variables().items():
        assert name in rows, f"{name} is missing from docs/configuration.md"
        assert rows[name][1] == f"`{default}`", f"{name}: the page says {rows[name][1]}"


def test_the_page_names_no_enrich_setting_that_does_not_exist() -> None:
    named = set(re.findall(r"ENRICH_[A-Z0-9_]+[A-Z0-9]", PAGE))

    assert named - set(enrich_variables()) == set()


def test_each_celery_setting_in_the_table_has_the_value_celeryconfig_gives_it() -> None:
    rows = table_rows()
    celery_rows = {name: cells for name, cells in rows.items() if name.islower()}

    for cell, cells in celery_rows.items():
        names = [name.strip("` ") for name in cell.split(",")]
        values = [ast.literal_eval(v.strip("` ")) for v in cells[1].strip("`").split("`, `")]
        assert [getattr(celeryconfig, name) for name in names] == values, cell
    assert len(celery_rows) >= 10
