import subprocess
import sys

import pytest

from peftlab.apps.cli import main

from conftest import tiny_gpt2, tiny_llama


@pytest.fixture
def llama_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_inspect_lists_roles_and_paths(llama_dir, capsys):
    assert main(["inspect", "--model", str(llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "architecture map: llama" in out
    assert "model.layers.{0-1}.self_attn.q_proj" in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and not line.startswith("   ")}
    assert lines["attn.q"].split()[1] == "2" and lines["ffn.down"].split()[1] == "2"


def test_inspect_full_and_gpt2(tmp_path, capsys):
    tiny_gpt2().save_pretrained(tmp_path / "g")
    assert main(["inspect", "--model", str(tmp_path / "g"), "--full"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in out and "transformer.h.1.attn.c_attn" in out and "attn.qkv" in out


def test_inspect_bad_path_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", "--model", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run(["peftlab", "--help"], capture_output=True, text=True, check=True).stdout
    assert "inspect" in out
    out = subprocess.run([sys.executable, "-m", "peftlab.apps.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "inspect" in out
