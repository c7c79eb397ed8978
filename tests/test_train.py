"""The training loop on a tiny Llama: real optimisation, no mocks. The DDP test runs torchrun."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.training.loop import TaskLike, TrainConfig, index_stream, lr_factor, train

from conftest import tiny_llama

SEQ = 16
TENSORS = "adapter_model.safetensors"


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


class LMTask:
    """Causal LM on fixed-length token sequences: loss = the model's mean next-token loss.

    `raise_at`: raise KeyboardInterrupt on that call of `loss` (0-based), as Ctrl-C would.
    `snapshots`: the adapter's tensors at each evaluation, to compare with what was saved.
    """

    metric = "loss"
    higher_is_better = False

    def __init__(self, raise_at: int | None = None, adapter: str = "a") -> None:
        self.calls = 0
        self.raise_at = raise_at
        self.adapter = adapter
        self.snapshots: list[dict[tuple[str, str], torch.Tensor]] = []

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.stack([r["input_ids"] for r in rows])}

    def loss(self, model, batch):
        if self.calls == self.raise_at:
            raise KeyboardInterrupt
        self.calls += 1
        return lm_loss(model, batch)

    def evaluate(self, model, rows, batch_size):
        assert not model.training
        if self.adapter in getattr(model, "adapters", {}):
            self.snapshots.append({k: v.detach().clone()
                                   for k, v in model.adapter_tensors(self.adapter).items()})
        total = 0.0
        for i in range(0, len(rows), batch_size):
            batch = self.collate(rows[i:i + batch_size])
            total += float(lm_loss(model, batch)) * len(batch["input_ids"])
        return {"loss": total / len(rows)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP threads on a shared 2-core machine
    can stall each other for seconds; restore the setting for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_rows(n: int, seed: int) -> list[dict]:
    """Counting sequences (start + k·t mod 16, k in {1, 2}): a pattern a LoRA can learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 16, (n, 1), generator=g)
    k = torch.randint(1, 3, (n, 1), generator=g)
    ids = (start + k * torch.arange(SEQ)) % 16 + 1
    return [{"input_ids": row} for row in ids]


TRAIN = make_rows(32, seed=1)
EVAL = make_rows(16, seed=2)


def make_am(seed: int = 0, targets=("all-linear", "head")):
    am = peftlab.adapt(tiny_llama(seed))
    torch.manual_seed(seed)
    am.add_adapter("a", peftlab.LoraConfig(r=4, alpha=8, targets=list(targets)))
    am.set_active(["a"])
    am.set_trainable("a")
    return am


def cfg(**kw) -> TrainConfig:
    base = {"steps": 12, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.25, "progress": False}
    return TrainConfig(**(base | kw))


@torch.no_grad()
def eval_loss(am) -> float:
    return LMTask().evaluate(am.eval(), EVAL, 8)["loss"]


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The saved adapter's exact tensors, keyed '<module path>:<tensor name>', read back through
    load_adapter (its record says which file holds them: for LoRA, peft's)."""
    am = peftlab.adapt(tiny_llama())
    am.load_adapter(directory, "saved")
    return {f"{p}:{n}": t for (p, n), t in am.adapter_tensors("saved").items()}


def assert_close_tensors(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k, t in a.items():
        torch.testing.assert_close(t, b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_task_satisfies_protocol():
    assert isinstance(LMTask(), TaskLike)


def test_training_lowers_loss_changes_only_adapter_and_follows_schedule():
    am = make_am()
    adapter_ids = {id(p) for p in am.adapter_parameters("a")}
    base = {n: t.clone() for n, t in am.named_parameters() if id(t) not in adapter_ids}
    base |= {n: t.clone() for n, t in am.named_buffers()}
    before_adapter = {k: v.clone() for k, v in am.adapter_tensors("a").items()}
    before = eval_loss(am)
    am.eval()
    steps, warmup = 20, 4
    result = train(am, "a", LMTask(), TRAIN, EVAL, cfg(steps=steps, warmup_ratio=0.2))
    assert not am.training                          # the caller's mode is restored
    assert result.steps_done == steps and not result.interrupted
    assert len(result.losses) == steps and len(result.lrs) == steps
    after = eval_loss(am)
    assert after < before - 1.0, (before, after)
    assert result.evals[-1][0] == steps and result.evals[-1][1]["loss"] == pytest.approx(after, abs=1e-5)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    # only adapter tensors moved
    for n, t in list(am.named_parameters()) + list(am.named_buffers()):
        if n in base:
            assert torch.equal(t, base[n]), n
    assert any(not torch.equal(v, before_adapter[k]) for k, v in am.adapter_tensors("a").items())
    # linear warm-up to the peak, then cosine to 0
    lr = 1e-2
    assert result.lrs[0] == pytest.approx(lr / warmup)
    assert result.lrs[warmup - 1] == pytest.approx(lr)
    assert result.lrs[warmup] == pytest.approx(lr)
    mid = warmup + (steps - warmup) // 2
    assert result.lrs[mid] == pytest.approx(lr * 0.5)
    assert result.lrs[-1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (steps - 1 - warmup) / (steps - warmup))))
    assert lr_factor(steps, steps, warmup) == pytest.approx(0.0, abs=1e-12)
    assert result.best["step"] == steps and result.examples_per_second > 0


def test_errors_for_untrainable_setups():
    am = make_am()
    am.set_trainable(None)
    with pytest.raises(peftlab.PeftlabError, match=r"set_trainable\('a'\)"):
        train(am, "a", LMTask(), TRAIN, None, cfg(steps=1))
    am.set_trainable("a")
    am.set_active([])
    with pytest.raises(peftlab.AdapterError, match="not active"):
        train(am, "a", LMTask(), TRAIN, None, cfg(steps=1))
    with pytest.raises(peftlab.ConfigError, match="grad_accum"):
        train(am, "a", LMTask(), TRAIN, None, cfg(grad_accum=0))


def test_data_order_is_seeded_and_covers_each_epoch():
    stream = index_stream(10, seed=3)
    epochs = [[next(stream) for _ in range(10)] for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]                       # reshuffled per epoch
    again = index_stream(10, seed=3)
    assert [next(again) for _ in range(30)] == [i for e in epochs for i in e]
    other = index_stream(10, seed=4)
    assert [next(other) for _ in range(10)] != epochs[0]


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    def run(seed, out):
        am = make_am()
        train(am, "a", LMTask(), TRAIN, None, cfg(steps=6, seed=seed, out=out))
        return (out / "last" / TENSORS).read_bytes()

    first = run(0, tmp_path / "r1")
    assert run(0, tmp_path / "r2") == first
    assert run(1, tmp_path / "r3") != first
    assert not (tmp_path / "r1" / "best").exists()     # no eval rows: no "best"


def test_grad_accumulation_matches_the_big_batch():
    a1, a2 = make_am(), make_am()
    r1 = train(a1, "a", LMTask(), TRAIN, None, cfg(steps=6, batch_size=8, grad_accum=1))
    r2 = train(a2, "a", LMTask(), TRAIN, None, cfg(steps=6, batch_size=4, grad_accum=2))
    assert r1.losses == pytest.approx(r2.losses, abs=1e-6)
    assert_close_tensors(a1.adapter_tensors("a"), a2.adapter_tensors("a"), atol=1e-6)


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_best_and_last_are_saved_and_reload(tmp_path, higher_is_better):
    am = make_am()
    task = LMTask()
    task.higher_is_better = higher_is_better   # True: "best" is the worst loss, i.e. the first eval
    result = train(am, "a", task, TRAIN, EVAL, cfg(steps=9, eval_every=3, out=tmp_path))
    assert [s for s, _ in result.evals] == [3, 6, 9]
    values = [m["loss"] for _, m in result.evals]
    pick = max if higher_is_better else min
    best_step = result.evals[values.index(pick(values))][0]
    assert best_step == (3 if higher_is_better else 9)
    assert result.best["step"] == best_step and result.best["value"] == pick(values)
    assert result.saved == {"last": tmp_path / "last", "best": tmp_path / "best"}
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["best", "last"] + ["adapter_config.json", TENSORS, "peftlab.json"] * 2)   # no stray temp files
    for name, expected in (("best", result.best["value"]), ("last", values[-1])):
        am.load_adapter(tmp_path / name, name)
        am.set_active([name])
        assert eval_loss(am) == pytest.approx(expected, abs=1e-5)
    # "best" holds exactly the adapter as it was at the best evaluation
    snap = task.snapshots[[s for s, _ in result.evals].index(best_step)]
    assert_close_tensors({f"{p}:{n}": t for (p, n), t in snap.items()},
                         saved_tensors(tmp_path / "best"), atol=0)


def test_keyboard_interrupt_keeps_last_checkpoint(tmp_path):
    am = make_am()
    modes = {n: m.training for n, m in am.named_modules()}   # a mix: the wrapper trains, the model not
    task = LMTask(raise_at=5)          # Ctrl-C during step 6, after the save at step 4
    result = train(am, "a", task, TRAIN, EVAL, cfg(steps=12, eval_every=2, out=tmp_path))
    assert result.interrupted and result.steps_done == 5 and len(result.losses) == 5
    assert [s for s, _ in result.evals] == [2, 4]
    assert {n: m.training for n, m in am.named_modules()} == modes   # restored module by module
    saved = saved_tensors(tmp_path / "last")
    at_step_4 = {f"{p}:{n}": t for (p, n), t in task.snapshots[-1].items()}
    assert_close_tensors(saved, at_step_4, atol=0)
    live = {f"{p}:{n}": t for (p, n), t in am.adapter_tensors("a").items()}
    assert any(not torch.equal(live[k], saved[k]) for k in saved)   # step 5 was not saved
    am.load_adapter(tmp_path / "last", "restored")
    am.set_active(["restored"])
    assert eval_loss(am) == pytest.approx(result.evals[-1][1]["loss"], abs=1e-5)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_bf16_autocast_trains():
    am = make_am()
    before = eval_loss(am)
    result = train(am, "a", LMTask(), TRAIN, EVAL, cfg(steps=12, bf16=True))
    assert all(math.isfinite(x) for x in result.losses)
    fp32 = train(make_am(), "a", LMTask(), TRAIN, None, cfg(steps=2))
    assert result.losses[0] != fp32.losses[0]          # autocast really ran in bf16
    assert result.evals[-1][1]["loss"] < before - 0.5
    assert eval_loss(am) < before - 0.5


def test_progress_bar_prints_on_rank_0(capsys):
    am = make_am()
    train(am, "a", LMTask(), TRAIN, EVAL, cfg(steps=4, eval_every=2, log_every=2, progress=True))
    captured = capsys.readouterr()
    assert "step 2/4  loss " in captured.out + captured.err
    assert "ex/s=" in captured.err and "lr=" in captured.err


def test_ddp_two_processes_match_single_process(tmp_path):
    steps, seed = 5, 7
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(worker), str(tmp_path / "ddp"), str(steps), str(seed)],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the two ranks' lines may interleave
    assert "rank 0 saved ['best', 'last']" in proc.stdout and "rank 1 saved []" in proc.stdout, proc.stdout
    ddp_losses = [float(x) for x in re.search(r"losses ([-+.e\d ]+)", proc.stdout).group(1).split()]

    am = make_am()
    single = train(am, "a", LMTask(), TRAIN, EVAL,
                   cfg(steps=steps, seed=seed, batch_size=8, eval_every=2, out=tmp_path / "single"))
    assert ddp_losses == pytest.approx(single.losses, abs=1e-5)
    assert_close_tensors(saved_tensors(tmp_path / "ddp" / "last"),
                         saved_tensors(tmp_path / "single" / "last"), atol=1e-5)
    files = sorted(str(p.relative_to(tmp_path / "ddp")) for p in (tmp_path / "ddp").rglob("*"))
    assert files == sorted(f"{d}{f}" for d in ("best", "last")
                           for f in ("", "/adapter_config.json", f"/{TENSORS}", "/peftlab.json"))
