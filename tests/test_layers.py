"""The folder tree is the architecture: tools/check_layers.py finds no import cycle and no import
from a layer above, and it catches both when they are there."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
sys.modules["check_layers"] = check_layers
spec.loader.exec_module(check_layers)


def test_no_cycles_and_no_upward_imports():
    assert check_layers.violations() == []


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "src" / "peftlab"
    for folder in ("core", "apps"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("from ..apps import cli\nfrom . import b\n")
    (package / "core" / "b.py").write_text("from .a import x\n")
    (package / "apps" / "cli.py").write_text("def main():\n    from ..core import a\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "x.py").write_text("from peftlab.apps.cli import main\n")
    monkeypatch.setattr(check_layers, "ROOT", tmp_path)
    monkeypatch.setattr(check_layers, "PACKAGE", package)
    found = check_layers.violations()
    assert any("core imports peftlab.apps.cli" in v for v in found), found
    assert "import cycle: peftlab.core.a -> peftlab.core.b -> peftlab.core.a" in found
    assert any(v.startswith("bench/x.py:1: bench imports peftlab.apps.cli") for v in found)
    assert len(found) == 3    # the lazy import of core from apps is downward: fine


def layout_entries() -> dict[str, str]:
    """README Layout block: path under src/peftlab -> its one-line purpose (indentation = nesting)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    entries, stack = {}, []
    for line in block.splitlines()[1:]:           # under "src/peftlab/"
        name, _, purpose = line.strip().partition("  ")
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        if depth < 0:
            break                                 # tests/, bench/: outside the package
        if not name or (not purpose.strip() and not name.endswith("/")):
            continue                              # a purpose continued on the next line
        stack[depth:] = [name]
        entries["".join(stack)] = purpose.strip()
    return entries


def test_readme_layout_lists_every_module_with_its_purpose():
    entries = layout_entries()
    package = ROOT / "src" / "peftlab"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.name != "__init__.py" or p.read_text().count("\n") > 3}   # not bare docstrings
    assert sorted(modules - set(entries)) == []
    assert sorted(m for m in entries if m.endswith(".py") and m not in modules) == []
    assert all(entries[m] for m in modules)
