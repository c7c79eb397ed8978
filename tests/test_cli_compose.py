"""`peftlab compose`: adapters trained with the CLI combined from the command line, checked by
loading the results and by `peftlab eval`."""

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

# The train tests' tiny local Llama (a module fixture) and their skip mark without the assets.
from test_cli_train import pytestmark, tiny_dir  # noqa: F401
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from peftlab.apps.cli import _load_for_adapter, main
from peftlab.apps.compose_command import COMPOSE_MERGES
from peftlab.apps.compose_command import adapter_name as _adapter_name
from peftlab.apps.recipes import base_for_run as _base_for_run
from peftlab.apps.recipes import run_record as _run_record

TRAIN = ["--steps", "3", "--batch-size", "4", "--lr", "5e-3", "--eval-size", "12"]


def _reviews(directory: Path) -> Path:
    rows = [("a warm, funny and moving film", "positive"), ("dull and far too long", "negative")] * 30
    path = directory / "reviews.csv"
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    return path


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):  # noqa: F811
    """Two LoRA adapters on the same tiny base, different seeds: {"a": RUN/last, "b": RUN/last}."""
    root = tmp_path_factory.mktemp("compose")
    reviews = _reviews(root)
    runs = {}
    for name, seed in (("a", "0"), ("b", "1")):
        assert main(["train", "--model", str(tiny_dir), "--task", str(reviews), *TRAIN, "--seed", seed,
                     "--out", str(root / name)]) == 0
        runs[name] = root / name / "last"
    return runs


def _load(*dirs: Path):
    """The base of the first directory's run with every directory loaded (inactive) as d0, d1, ..."""
    am, tok, _, _ = _base_for_run(_run_record(dirs[0]), dirs[0])
    for i, d in enumerate(dirs):
        am.load_adapter(d, f"d{i}")
    return am.eval(), tok


def _delta_weights(am, name: str) -> dict[str, torch.Tensor]:
    a = am.adapters[name]
    return {s.path: a.layers[s.path].deltas[name].delta_weight() for s in a.sites}


def test_negate_then_add_gives_back_the_base_model(trained, tmp_path, capsys):
    neg, zero = tmp_path / "neg", tmp_path / "zero"
    assert main(["compose", "--op", "negate", str(trained["a"]), "--out", str(neg)]) == 0
    assert "provenance" in capsys.readouterr().out
    assert main(["compose", "--op", "add", str(trained["a"]), str(neg), "--weights", "1,1",
                 "--out", str(zero)]) == 0
    out = capsys.readouterr().out
    assert "add of a (×1) + neg (×1)" in out and f"adapter saved: {zero}" in out

    am, _ = _load(trained["a"], neg)
    for path, dw in _delta_weights(am, "d0").items():
        assert dw.abs().max() > 0
        torch.testing.assert_close(_delta_weights(am, "d1")[path], -dw, rtol=0, atol=1e-7)

    args = argparse.Namespace(adapter=str(zero), model=None, task=None, seed=0, max_length=96)
    am, tok, _, _, run = _load_for_adapter(args)
    ids = tok(["a fine film", "dull and long"], return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        composed = am(**ids).logits
        with am.disabled():
            base = am(**ids).logits
    torch.testing.assert_close(composed, base, rtol=0, atol=1e-5)
    assert run["composed"]["op"] == "add" and run["composed"]["weights"] == [1.0, 1.0]
    assert run["composed"]["inputs"] == [str(trained["a"].resolve()), str(neg.resolve())]
    assert "after" not in run    # the first input's score does not describe the composite

    # `peftlab eval` on the composite scores exactly what the base scored before training.
    assert main(["eval", "--adapter", str(zero)]) == 0
    assert f"accuracy {run['before']['accuracy']:.4f}" in capsys.readouterr().out


def test_weighted_sum_and_analogy_are_exact_per_site(trained, tmp_path, capsys):
    avg, same = tmp_path / "avg", tmp_path / "same"
    assert main(["compose", "--op", "add", str(trained["a"]), str(trained["b"]), "--weights", "0.5,0.5",
                 "--out", str(avg)]) == 0
    # a + (b − b) is a, whatever the weights of the difference
    assert main(["compose", "--op", "analogy", str(trained["a"]), str(trained["b"]), str(trained["b"]),
                 "--weights", "1,0.7", "--out", str(same)]) == 0
    capsys.readouterr()
    am, _ = _load(trained["a"], trained["b"], avg, same)
    dw_a, dw_b = _delta_weights(am, "d0"), _delta_weights(am, "d1")
    assert set(dw_a) == set(_delta_weights(am, "d2")) and len(dw_a) == 4     # attn.q, attn.v × 2 layers
    for path, dw in _delta_weights(am, "d2").items():
        torch.testing.assert_close(dw, 0.5 * dw_a[path] + 0.5 * dw_b[path], rtol=0, atol=1e-6)
    for path, dw in _delta_weights(am, "d3").items():
        torch.testing.assert_close(dw, dw_a[path], rtol=0, atol=1e-6)
    assert am.adapters["d2"].provenance["inputs"][1]["weight"] == 0.5
    assert json.loads((same / "run.json").read_text())["composed"]["weights"] == [1.0, 0.7, -0.7]


def test_ties_at_rank_4_is_saved_and_scored_by_eval(trained, tmp_path, capsys):
    out = tmp_path / "ties"
    assert main(["compose", "--op", "ties", str(trained["a"].parent), str(trained["b"]), "--rank", "4",
                 "--density", "0.3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    err = re.search(r"SVD truncation \(rank 4\): relative error max ([\d.e+-]+), mean ([\d.e+-]+) over 4 sites",
                    text)
    assert err and 0 <= float(err.group(2)) <= float(err.group(1)) <= 1
    assert "ties of a (×0.5) + b (×0.5)" in text and "density 0.3" in text
    assert json.loads((out / "peftlab.json").read_text())["config"]["r"] == 4
    composed = json.loads((out / "run.json").read_text())["composed"]
    assert composed["merge"] == "ties_svd" and composed["density"] == 0.3 and composed["rank"] == 4
    assert main(["eval", "--adapter", str(out)]) == 0
    assert re.search(rf"{re.escape(str(out))}: accuracy [\d.]+ on \d+ held-out test rows", capsys.readouterr().out)


def test_bad_requests_are_one_line_errors(trained, tmp_path, capsys):
    a, b = str(trained["a"]), str(trained["b"])
    other = tmp_path / "other" / "last"
    shutil.copytree(trained["b"], other)
    record = json.loads((trained["b"].parent / "run.json").read_text())
    (other.parent / "run.json").write_text(json.dumps({**record, "model": "minilm"}))
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    cases = [
        (["--op", "negate", a, b], "--op negate takes 1 adapter directory (negate ADAPTER); got 2"),
        (["--op", "add", a, b, "--weights", "0.5,0.3,0.2"], "one weight per adapter directory (2); got 3"),
        (["--op", "add", a, b, "--weights", "0.5,x"], "'x' is not a number"),
        (["--op", "scale", a], "--op scale needs the factor"),
        (["--op", "subtract", a, b, "--weights", "1,1"], "--op subtract takes no --weights"),
        (["--op", "ties", a], "--op ties combines two or more adapter directories; got 1"),
        (["--op", "ties", a, b, "--mode", "parameter"], "merges in delta space"),
        (["--op", "add", a, b, "--density", "0.2"], "--density is for --op magnitude"),
        (["--op", "add", a, str(tmp_path / "missing")], "missing does not exist"),
        (["--op", "add", a, str(tmp_path / "empty")], "is not an adapter directory (no peftlab.json or adapter_config.json"),
        (["--op", "add", a, str(other)], f"{other} was trained on model 'minilm' but {a} on"),
        (["--op", "ties", a, b, "--weights", "-1,1"], "ties takes positive weights"),   # the library's check
    ]
    for argv, message in cases:
        assert main(["compose", *argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("peftlab compose: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err
    assert main(["compose", "--op", "add", a, b, "--out", str(trained["a"].parent)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert not Path(out).exists()


def test_a_head_drawn_from_another_seed_is_a_different_base(tiny_dir, tmp_path, capsys):  # noqa: F811
    """An encoder gets a new classification head drawn from the run's seed, trained as a whole
    module: adapters of one seed compose (the head as a delta from the base), of two seeds not."""
    bert = tmp_path / "bert"
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=128)).save_pretrained(bert)
    tok.save_pretrained(bert)
    run = tmp_path / "b0"
    assert main(["train", "--model", str(bert), "--task", str(_reviews(tmp_path)), "--steps", "2",
                 "--batch-size", "4", "--eval-size", "12", "--out", str(run)]) == 0
    twin = tmp_path / "b1"
    shutil.copytree(run, twin)
    avg = tmp_path / "avg"
    assert main(["compose", "--op", "add", str(run), str(twin), "--out", str(avg)]) == 0
    capsys.readouterr()
    am, _ = _load(run / "last", avg)
    (path,) = am.adapters["d0"].copies
    trained, composed = (am.adapters[n].copies[path].copies[n].state_dict() for n in ("d0", "d1"))
    for key, t in trained.items():
        torch.testing.assert_close(composed[key], t, rtol=0, atol=1e-6)

    record = json.loads((twin / "run.json").read_text())
    (twin / "run.json").write_text(json.dumps({**record, "seed": 1}))
    assert main(["compose", "--op", "add", str(run), str(twin), "--out", str(tmp_path / "bad")]) == 2
    assert "different seeds ([0, 1])" in capsys.readouterr().err


def test_adapter_names_from_directory_names_are_valid_and_unique():
    taken: set[str] = set()
    names = [_adapter_name(Path(p), taken) for p in
             ("runs/pos/last", "runs/pos/last", "x/half", "x/training", "x/a b.c", "x/.", "runs/neg")]
    assert names == ["pos", "pos_2", "adapter_half", "adapter_training", "a_b_c", "x", "neg"]


def test_the_command_offers_compose_s_merges():
    from peftlab.compose import LOWRANK_MERGES, MERGES
    assert set(COMPOSE_MERGES) == set(MERGES + LOWRANK_MERGES)


def test_factor_wise_ties_and_exact_dense_merge_with_lam(trained, tmp_path, capsys):
    out = tmp_path / "tf"
    assert main(["compose", "--op", "ties_factors", str(trained["a"]), str(trained["b"]), "--density", "0.4",
                 "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["composed"]["merge"] == "ties_factors"
    capsys.readouterr()
    exact = tmp_path / "exact"
    assert main(["compose", "--op", "ties_svd", str(trained["a"]), str(trained["b"]), "--rank", "full",
                 "--lam", "1.5", "--out", str(exact)]) == 0
    text = capsys.readouterr().out
    assert "ties_svd at full rank: exact, no truncation" in text
    composed = json.loads((exact / "run.json").read_text())["composed"]
    assert composed["lam"] == 1.5 and composed["rank"] == "full"
    assert main(["compose", "--op", "add", str(trained["a"]), str(trained["b"]), "--lam", "2",
                 "--out", str(tmp_path / "no")]) == 2
    assert "--lam scales a merged task vector" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
