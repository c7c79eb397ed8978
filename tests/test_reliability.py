"""The reliability matrix: what peftlab guarantees when inputs, files, processes or clients
misbehave, one row per case (item | case | expected | observed before the fix), each row held
by a test that failed on the code before its fix.

The rows live in the docstrings of the area modules, beside their tests:
  test_reliability_io.py      checkpoints and every file peftlab writes or reads (items 1, 7, 8, 10, 13)
  test_reliability_model.py   the model, merging and training numerics (items 2, 3, 4, 6, 7, 11)
  test_reliability_cli.py     the command line and data files (items 5, 9, 12)
  test_reliability_server.py  the server and the adapter bank (items 14, 15, 16)
Items are the numbered defects of issue 19. Extend the matrix by adding a row to an area's table
and a test named `test_item_<N>_<what>` there (a new area: a new test_reliability_<area>.py);
the tests below keep the rows and the tests in step.
"""

import ast
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
AREAS = sorted(HERE.glob("test_reliability_*.py"))
ITEMS = range(1, 17)     # issue 19's items


def rows(path: Path) -> list[list[str]]:
    """The cells of each table row of a module docstring (both `|`-bordered and bare tables)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    out = []
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].isdigit():
            out.append(cells)
    return out


def items_tested(path: Path) -> set[int]:
    names = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]
    return {int(m.group(1)) for n in names if (m := re.match(r"test_item_(\d+)_", n))}


def test_every_item_has_rows_and_tests():
    assert [p.name for p in AREAS] == ["test_reliability_cli.py", "test_reliability_io.py",
                                       "test_reliability_model.py", "test_reliability_server.py"]
    in_rows = {int(r[0]) for p in AREAS for r in rows(p)}
    in_tests = set().union(*(items_tested(p) for p in AREAS))
    assert sorted(set(ITEMS) - in_rows) == [] and sorted(set(ITEMS) - in_tests) == []


def test_each_area_tests_the_items_its_table_lists():
    for path in AREAS:
        listed = {int(r[0]) for r in rows(path)}
        assert listed == items_tested(path), path.name
        assert all(all(cell for cell in r[:4]) for r in rows(path)), path.name   # no empty cell
