"""`peftlab methods`: the PEFT-Ref typology table is generated from the method records."""

from __future__ import annotations

import json

import pytest

from peftlab.apps.cli import main
from peftlab.methods import METHODS
from peftlab.core.typology import TABLE_COLUMNS


def run(capsys, *argv: str) -> str:
    assert main(["methods", *argv]) == 0
    return capsys.readouterr().out


def test_json_rows_match_the_records(capsys):
    rows = json.loads(run(capsys, "--format", "json"))
    assert [r["method"] for r in rows] == list(METHODS)
    for row in rows:
        record = METHODS[row["method"]].typology
        for heading, attr in TABLE_COLUMNS:
            value = getattr(record, attr)
            assert row[heading] == (list(value) if isinstance(value, tuple) else value), (row["method"], heading)


@pytest.mark.parametrize("fmt", ["text", "markdown"])
def test_one_row_per_method(capsys, fmt):
    out = run(capsys, "--format", fmt).splitlines()
    body = out[2:]                      # heading and rule first in both formats
    assert len(body) == len(METHODS)
    for line, (name, method) in zip(body, METHODS.items(), strict=True):
        cells = [c.strip() for c in line.strip("| ").split("|")] if fmt == "markdown" else None
        assert line.lstrip("| ").startswith(name + " ")
        assert method.typology.form in line and method.typology.param_formula in line
        if cells is not None:
            assert cells[1] == ", ".join(method.typology.site_roles)
            assert cells[10] == ("yes" if method.typology.mergeable else "no")
