"""The support matrix (peftlab.apps.support): one test per model family over LoRA, IA3 (default
targets and all-linear) and prompt tuning; `peftlab support --format markdown` equals
docs/support.md.

A family's test fails on any FAIL cell and on a refused cell whose reason is not one of
ACCEPTED_REFUSALS (the method does not apply to that family). Rows are computed once per session
and shared with the document test."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.apps import support
from peftlab.apps.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "support.md"

# (family, column) -> a phrase the refusal's reason must contain: where the method does not
# apply, and why
ACCEPTED_REFUSALS = {
    # prompt tuning hands the prompted sequence over as inputs_embeds: ViT and the CNN read
    # pixels, Whisper audio features, and CLIP pools at the end token it finds in input_ids
    **{(family, "prompt"): "takes no inputs_embeds" for family in ("vit", "conv2d-net", "clip", "whisper")},
    # the CNN's only linear layer is its classifier head, which all-linear leaves out (as peft)
    ("conv2d-net", "lora all-linear"): "target 'all-linear' matches no module",
    ("conv2d-net", "ia3 all-linear"): "target 'all-linear' matches no module",
}


def _lands(branch: str, what: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"issue 22: {branch} lands it ({what})")


# families that fail today on parts other branches of issue 22 build; the lead removes these
# marks after merging them
PENDING = {
}

_ROWS: dict[str, dict[str, support.Cell]] = {}


def row_of(family: str) -> dict[str, support.Cell]:
    """The family's row, computed once per session."""
    if family not in _ROWS:
        _ROWS[family] = support.family_row(family)
    return _ROWS[family]


def problems_of(family: str, row: dict[str, support.Cell]) -> list[str]:
    """Every FAIL cell, and every refused cell whose reason is not the accepted one."""
    problems = []
    for column, cell in row.items():
        accepted = ACCEPTED_REFUSALS.get((family, column))
        if cell.status == "FAIL" or (cell.status == "refused" and (accepted is None
                                                                   or accepted not in cell.detail)):
            problems.append(f"{column}: {cell.text()}")
    return problems


def test_at_least_thirty_families_with_every_column():
    assert len(support.FAMILIES) >= 30
    assert [c.name for c in support._columns()] == list(support.COLUMN_NAMES)


@pytest.mark.parametrize("family", [pytest.param(name, marks=PENDING[name]) if name in PENDING else name
                                    for name in support.FAMILIES])
def test_family(family):
    problems = problems_of(family, row_of(family))
    assert not problems, f"{family}:\n" + "\n".join(problems)


def test_accepted_refusals_name_real_cells():
    for family, column in ACCEPTED_REFUSALS:
        assert family in support.FAMILIES and column in support.COLUMN_NAMES


def test_cli_markdown_equals_docs_support_md(monkeypatch, capsys):
    """Acceptance 6: `peftlab support --format markdown` prints docs/support.md (the CLI's own
    code path; rows the family tests computed are reused)."""
    monkeypatch.setattr(support, "family_row", row_of)
    assert main(["support", "--format", "markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed == DOC.read_text(), ("docs/support.md is stale; regenerate it with "
                                        "`peftlab support --format markdown > docs/support.md`")


def test_cli_json_and_table_for_chosen_families(monkeypatch, capsys):
    import json
    monkeypatch.setattr(support, "family_row", row_of)
    assert main(["support", "--format", "json", "--family", "gpt2,bert"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["gpt2", "bert"]
    assert data["gpt2"]["lora"]["status"] == "ok" and data["gpt2"]["lora"]["trainable"] == 2048
    assert main(["support", "--family", "gpt2"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["family", "lora", "lora", "all-linear", "ia3", "ia3",
                                             "all-linear", "prompt"]
    assert main(["support", "--family", "gpt-3"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_a_cell_reports_a_failed_check_without_numbers_or_addresses():
    """A check that fails is a FAIL cell naming it; the text has no memory address (the document
    must not change between runs)."""
    fm = support.FamilyModel.build(support.FAMILIES["gpt2"])
    broken = support.FamilyModel(fm.family, fm.model, fm.inputs, fm.base + 1)   # a wrong "base"
    cell = support.check_cell(broken, support._columns()[0])
    assert cell.status == "FAIL" and "not a no-op" in cell.detail
    assert support._clean("<object at 0x7f00deadbeef> failed") == "<object> failed"
    assert support._clean("modules {'out_proj', 'conv1d'}") == "modules {'conv1d', 'out_proj'}"
