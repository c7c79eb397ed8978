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
            headings = ["method", *(h for h, _ in TABLE_COLUMNS)]
            assert cells[headings.index("mergeable")] == ("yes" if method.typology.mergeable else "no")


@pytest.mark.parametrize("fmt", ["text", "markdown"])
def test_every_row_shows_its_inter_connectivity(capsys, fmt):
    """PEFT-Ref's interaction with the model: fixed (combined by a fixed rule) or dynamic (the
    input decides), with the reason; prompt, prefix and Context-PEFT are dynamic, LoRA fixed."""
    out = run(capsys, "--format", fmt).splitlines()
    assert "inter-connectivity" in out[0]
    for line, (name, method) in zip(out[2:], METHODS.items(), strict=True):
        value = method.typology.inter_connectivity
        assert value.split(" ")[0] in ("fixed", "dynamic") and "(" in value, name
        assert value.replace("|", "\\|" if fmt == "markdown" else "|") in line, name
        if fmt == "markdown":
            cells = [c.strip() for c in line.strip("| ").split(" | ")]
            assert cells[[h for h, _ in TABLE_COLUMNS].index("inter-connectivity") + 1] == value
    kinds = {n: m.typology.inter_connectivity.split(" ")[0] for n, m in METHODS.items()}
    assert {n for n, k in kinds.items() if k == "dynamic"} == {"prompt", "prefix", "context"}
    assert kinds["lora"] == kinds["ia3"] == kinds["bitfit"] == "fixed"


def test_cards_show_inter_connectivity():
    import peftlab
    from conftest import tiny_llama
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", peftlab.LoraConfig(r=2))
    card = am.card("a")
    assert "inter connectivity" in card and METHODS["lora"].typology.inter_connectivity in card


def test_typology_refuses_a_missing_or_unknown_inter_connectivity():
    from peftlab.core.typology import Typology
    base = dict(site_roles=("attn.q",), form="lowrank", integration="weight-delta", intra_connectivity="dense",
                adaptation="addition", parameter_sharing="none", input_type="x", insertion="parallel",
                insertions_per_layer="1", workspace="q", param_formula="r")
    with pytest.raises(TypeError):
        Typology(**base)
    with pytest.raises(ValueError, match="inter_connectivity"):
        Typology(**base, inter_connectivity="sometimes")
    assert Typology(**base, inter_connectivity="fixed (added)").inter_connectivity == "fixed (added)"
