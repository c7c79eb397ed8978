"""Reliability of the command line and the data files (issue 19: nothing lost, nothing silent).

Each test is named after its item of the issue and failed on the code before the fix.

| item | case | expected | observed before the fix |
|------|------|----------|-------------------------|
| 5 | `train --out` an existing file, or a path under a file | exit 2 before the model loads, naming the path | trained every step, then a NotADirectoryError traceback; the adapter was lost |
| 5 | `train --out` a read-only directory (chattr +i as root) | exit 2 before the model loads | trained every step, then a PermissionError traceback |
| 5 | too little free space for the adapter | exit 2 before training, naming the bytes needed and free | trained, then failed on the save |
| 5 | the final save fails after training (the location broke after the check) | the adapter, its run.json and its prune plan in a fallback directory; exit 2 saying where; `peftlab eval` of it reproduces the score | traceback; the adapter was gone |
| 5 | a run without --prune into a directory that holds an earlier run's prune_plan.json | the stale plan is removed; eval loads the adapter | eval pruned the base by the old plan and refused the adapter |
| 9 | `--eval-size -1` / `0`, `--max-length 0`, `--steps 0`, `--batch-size 0`, `--grad-accum 0`, `--rank 0`, `--eval-batch-size 0`, `--estimate-steps 0`, `--galore-rank 0`, `--galore-gap 0`, `--seed 2**64`, eval `--eval-size 0`, generate `--max-new-tokens 0`, compose `--rank 0` | exit 2 at parsing, naming the option; `--seed -3` still accepted | all rows but one scored; accuracy 0.0000 on 0 rows; a traceback (range() arg 3); --estimate-steps 0 silently the default; others refused only after the model loaded |
| 9 | `eval` of a 2-label run on a 3-label CSV | exit 2 naming both label sets (recorded in run.json as `labels`) | accuracy 0.3333 and exit 0, no warning |
| 9 | `eval` of a 3-label run on a file with 2 of its labels | rows labelled by the run's label indices | the file's own indices (positive = 1, the run's neutral) |
| 9 | an old run.json without `labels` | evaluates as before (no check) | (same) |
| 12 | a CSV field of 200,001 characters | loads; csv's process-wide field limit is unchanged afterwards | DataError "not valid CSV (field larger than field limit (131072))" |
"""

import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# The train tests' tiny local Llama, their reviews CSV and their skip mark without the assets.
from test_cli_train import pytestmark as cli_needs_assets
from test_cli_train import reviews, tiny_dir  # noqa: F401

from peftlab import load_dataset
from peftlab.apps.cli import build_parser, main
from peftlab.apps.recipes import load_run_adapter

CLI_TRAIN = ["--steps", "2", "--batch-size", "4", "--eval-size", "12"]


def cli_train(tiny_dir, task, out, *extra: str) -> int:  # noqa: F811
    return main(["train", "--model", str(tiny_dir), "--task", str(task), *CLI_TRAIN, "--out", str(out),
                 *extra])


def cli_labelled_csv(path, labels):
    """A classification CSV with ten rows of each label, each label's rows worded alike."""
    words = {"positive": "a warm, funny and moving film", "negative": "dull and far too long",
             "neutral": "a film about a town"}
    path.write_text("text,label\n" + "".join(f'"{words[lab]}",{lab}\n' for lab in labels * 10))
    return path


# ---- item 5: the output location --------------------------------------------------------------
@cli_needs_assets
@pytest.mark.parametrize("where", ["file", "under a file"])
def test_item_5_out_that_is_a_file_is_refused_before_loading(where, tiny_dir, reviews, tmp_path,  # noqa: F811
                                                             capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    out = blocker if where == "file" else blocker / "run"
    assert cli_train(tiny_dir, reviews, out) == 2
    captured = capsys.readouterr()
    assert str(blocker) in captured.err and "not a directory" in captured.err
    assert "model " not in captured.out          # refused before the model and data were loaded
    assert blocker.read_text() == "keep me"


@cli_needs_assets
def test_item_5_read_only_out_is_refused_before_loading(tiny_dir, reviews, tmp_path, capsys):  # noqa: F811
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    immutable = False
    if os.geteuid() == 0 and shutil.which("chattr"):   # root ignores mode bits; +i binds root too
        immutable = subprocess.run(["chattr", "+i", str(locked)], capture_output=True,
                                   check=False).returncode == 0
    try:
        try:
            tempfile.TemporaryFile(dir=locked).close()
            pytest.skip("cannot make a read-only directory here (root without chattr +i)")
        except OSError:
            pass
        for out in (locked, locked / "run"):
            assert cli_train(tiny_dir, reviews, out) == 2
            captured = capsys.readouterr()
            assert f"--out {out}" in captured.err and "cannot write" in captured.err
            assert "model " not in captured.out
        assert not (locked / "run").exists()
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)


@cli_needs_assets
def test_item_5_too_little_free_space_is_refused_before_training(tiny_dir, reviews, tmp_path, capsys,  # noqa: F811
                                                                 monkeypatch):
    # Fault injection: the file system reports 4 KiB free (a full disk cannot be made cheaply).
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=4096))
    out = tmp_path / "run"
    assert cli_train(tiny_dir, reviews, out) == 2
    captured = capsys.readouterr()
    needed = re.search(r"needs about ([\d,]+) bytes .* 4,096 bytes free", captured.err)
    assert needed and int(needed.group(1).replace(",", "")) > 4096
    assert "before training" not in captured.out and not out.exists()


@cli_needs_assets
def test_item_5_failed_final_save_keeps_the_adapter_in_a_fallback(tiny_dir, reviews, tmp_path, capsys,  # noqa: F811
                                                                  monkeypatch):
    # The location breaks after the check (here: the check is skipped and --out is a file), so the
    # final save fails for real, after training.
    monkeypatch.setattr("peftlab.apps.recipes.check_output_dir", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    code = cli_train(tiny_dir, reviews, blocker, "--targets", "attn.q,attn.v,ffn.up",
                     "--prune", "heads=0.5", "--estimate-steps", "1")
    captured = capsys.readouterr()
    assert code == 2 and blocker.read_text() == "keep me"
    safe = re.search(r"the trained adapter is safe in (\S+)", captured.err)
    assert safe, captured.err
    fallback = Path(safe.group(1))
    assert fallback.parent == tmp_path / "tmp" and str(blocker) in captured.err
    run = json.loads((fallback / "run.json").read_text())
    assert (fallback / "prune_plan.json").is_file()
    after = float(re.search(r"after 2 steps: accuracy ([\d.]+)", captured.out).group(1))
    assert round(run["after"]["accuracy"], 4) == after
    assert main(["eval", "--adapter", str(fallback / "last")]) == 0
    assert f"accuracy {after:.4f}" in capsys.readouterr().out


@cli_needs_assets
def test_item_5_rerun_without_prune_drops_the_stale_prune_plan(tiny_dir, reviews, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert cli_train(tiny_dir, reviews, out, "--prune", "heads=0.5", "--estimate-steps", "1") == 0
    assert (out / "prune_plan.json").is_file()
    assert cli_train(tiny_dir, reviews, out) == 0
    after = float(re.search(r"after 2 steps: accuracy ([\d.]+)", capsys.readouterr().out).group(1))
    assert not (out / "prune_plan.json").exists()
    assert main(["eval", "--adapter", str(out / "last")]) == 0
    assert f"accuracy {after:.4f}" in capsys.readouterr().out


# ---- item 9: options and label sets ---------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["train", "--eval-size", "-1"], "--eval-size"),
    (["train", "--eval-size", "0"], "--eval-size"),
    (["train", "--max-length", "0"], "--max-length"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--grad-accum", "0"], "--grad-accum"),
    (["train", "--rank", "0"], "--rank"),
    (["train", "--eval-batch-size", "0"], "--eval-batch-size"),
    (["train", "--estimate-steps", "0"], "--estimate-steps"),
    (["train", "--galore-rank", "0"], "--galore-rank"),
    (["train", "--galore-gap", "0"], "--galore-gap"),
    (["train", "--seed", str(2 ** 64)], "--seed"),
    (["eval", "--adapter", "x", "--eval-size", "0"], "--eval-size"),
    (["eval", "--adapter", "x", "--eval-size", "-1"], "--eval-size"),
    (["generate", "--adapter", "x", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["compose", "--op", "add", "a", "b", "--out", "c", "--rank", "0"], "--rank"),
])
def test_item_9_meaningless_numbers_are_refused_at_parsing(argv, option, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)          # nothing may be written, and nothing is there to load
    if argv[0] == "train":               # a missing model: no download, no training, when accepted
        argv = [*argv, "--model", "no-model", "--task", "no-data.csv"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_item_9_meaningful_numbers_are_kept(capsys):
    args = build_parser().parse_args(["train", "--seed", "-3", "--eval-size", "1", "--max-length", "1"])
    assert (args.seed, args.eval_size, args.max_length) == (-3, 1, 1)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "[--eval-size EVAL_SIZE]" in capsys.readouterr().out   # the help text is unchanged


@cli_needs_assets
def test_item_9_eval_on_data_with_other_labels_is_refused(tiny_dir, tmp_path, capsys):  # noqa: F811
    two = cli_labelled_csv(tmp_path / "two.csv", ["negative", "positive"])
    three = cli_labelled_csv(tmp_path / "three.csv", ["negative", "neutral", "positive"])
    out = tmp_path / "run"
    assert cli_train(tiny_dir, two, out) == 0
    assert json.loads((out / "run.json").read_text())["labels"] == ["negative", "positive"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "last"), "--task", str(three)]) == 2
    err = capsys.readouterr().err
    assert "['negative', 'positive']" in err and "['negative', 'neutral', 'positive']" in err
    # --model and --task both given: the run record is still found and its labels checked.
    assert main(["eval", "--adapter", str(out / "last"), "--model", str(tiny_dir), "--task", str(three)]) == 2
    assert "['negative', 'neutral', 'positive']" in capsys.readouterr().err


@cli_needs_assets
def test_item_9_eval_on_a_subset_of_the_labels_uses_the_run_indices(tiny_dir, tmp_path, capsys):  # noqa: F811
    three = cli_labelled_csv(tmp_path / "three.csv", ["negative", "neutral", "positive"])
    two = cli_labelled_csv(tmp_path / "two.csv", ["negative", "positive"])
    out = tmp_path / "run"
    assert cli_train(tiny_dir, three, out) == 0
    *_, data, run = load_run_adapter(out / "last", task=str(two))
    assert data.labels == run["labels"] == ["negative", "neutral", "positive"]
    by_text = {r["text"]: r["label"] for r in data.train + data.test}
    assert by_text == {"a warm, funny and moving film": 2, "dull and far too long": 0}
    assert main(["eval", "--adapter", str(out / "last"), "--task", str(two)]) == 0


@cli_needs_assets
def test_item_9_old_run_record_without_labels_still_evaluates(tiny_dir, reviews, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert cli_train(tiny_dir, reviews, out) == 0
    after = float(re.search(r"after 2 steps: accuracy ([\d.]+)", capsys.readouterr().out).group(1))
    record = json.loads((out / "run.json").read_text())
    record.pop("labels", None)
    (out / "run.json").write_text(json.dumps(record))
    assert main(["eval", "--adapter", str(out / "last")]) == 0
    assert f"accuracy {after:.4f}" in capsys.readouterr().out


# ---- item 12: long CSV fields ---------------------------------------------------------------------
def test_item_12_csv_field_over_131072_characters_loads(tmp_path):
    long_text = "word " * 40_000 + "end"                     # 200,003 characters
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "".join(f'"{long_text if i == 0 else "short"}",{i % 2}\n'
                                             for i in range(10)))
    limit = csv.field_size_limit()
    data = load_dataset(path)
    texts = [r["text"] for r in data.train + data.validation + data.test]
    assert long_text in texts and max(map(len, texts)) == 200_003
    assert csv.field_size_limit() == limit                   # the process-wide limit is restored
