"""The README's set-up commands stay true: the tests run the parts after the install."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_install_and_test_commands():
    install, tests = setup_commands()[:2]
    assert "torch==2.13.0" in install and '-e ".[test]"' in install
    assert tests == "python3 -m pytest -q"
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_readme_main_job_runs(tmp_path):
    main_job = setup_commands()[0].split("&&", 1)[1].split()
    assert main_job[:2] == ["python3", "examples/quickstart.py"]
    out = subprocess.run([sys.executable, *main_job[1:], "--out", str(tmp_path), "--steps", "12"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", out)]
    assert losses[-1] < losses[0]
    assert float(re.search(r"merged - unmerged\| = ([\d.e+-]+)", out).group(1)) < 1e-5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
