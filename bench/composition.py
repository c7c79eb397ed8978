#!/usr/bin/env python
"""Adapter composition doing something real: sentiment steering by negation (SmolLM2) and the
average of two adapters trained on disjoint halves of a data set (MiniLM).

Part A, steering (SmolLM2-135M-Instruct + IMDB):
  pos        a LoRA trained as a causal LM on positive IMDB training reviews only (the first
             MAX_TOKENS tokens of each), STEPS_A steps
  neg        peftlab.negate(am, "pos"): -ΔW (the paper's negation)
  scale      peftlab.scale(am, "pos", -k): the scaled negation (k = 2 by default)
  --contrast also negrev, the same LoRA trained on negative reviews, and subtract(negrev, pos)
  Continuations of neutral review openings ("The movie", "I watched this film", ...) are sampled
  (top-p 0.9, a fixed seed per row, the same for every model) from the base model and each
  adapter; a sentiment classifier trained here (MiniLM + LoRA + head on IMDB reviews cut to
  CLF_TOKENS tokens, its held-out accuracy reported) scores each opening + continuation. Reported:
  the positive rate (p(positive) > 0.5), the mean p(positive), the confidently negative rate
  (p < 0.3), the share of continuations using film words (on-topic check) and the base model's
  perplexity of the continuations (fluency). Expected: pos > base > neg.
Part B, disjoint halves (MiniLM + Rotten Tomatoes):
  h1, h2     LoRA r 8 on attn.q, attn.v + the classification head (modules_to_save), trained on
             two disjoint halves of the training rows, the same steps each, from the same head
             and the same LoRA start (one seed)
  avg        peftlab.add(am, ["h1", "h2"], [0.5, 0.5]) in delta space (exact), in parameter
             space (the paper's), and merge_adapters(how="ties", density 0.5, rank 16); the sum
             (weights 1, 1); and, for reference, one adapter trained on all rows for the same steps
  Accuracy on the first EVAL held-out test rows. Acceptance: avg >= min(h1, h2).

Usage: python bench/composition.py [--quick] [--steps-a 150] [--steps-clf 200] [--steps-b 200]
                                   [--neg-scales 2] [--out docs/results/composition]
About 25 minutes on one (shared) CPU thread at the defaults; --quick is a ~3-minute smoke run
whose numbers mean nothing. Writes OUT.md (the tables) and OUT.json (all numbers, the sampled
texts and the environment).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import peftlab
from peftlab.apps.recipes import MODEL_DEFAULTS, build_job, method_config
from peftlab.assets import load_dataset, load_model
from peftlab.methods import get_method
from peftlab.training.loop import TrainConfig, train
from peftlab.training.tasks import CausalLMTask, ClassificationTask

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns  # bench/common.py

# Neutral openings of a movie review: no sentiment word, so the continuation decides.
OPENINGS = (
    "The movie", "This film", "I watched this film", "I saw this movie", "The plot of this movie",
    "The acting in this film", "The director of this film", "The story", "The ending of the movie",
    "The first half of the film", "The script", "The cast", "The soundtrack", "The characters",
    "This is a movie that", "I rented this movie", "My wife and I watched this film",
    "Last night I saw", "When I first heard about this movie", "I went into this film",
    "After watching this movie", "The special effects", "The lead actor", "This sequel",
    "The main character", "The dialogue", "I have seen many films, and this one",
    "This movie was released in", "The cinematography", "The second half",
    "I watched this with my kids and", "The book was turned into a film that", "The trailer",
    "This documentary", "The comedy", "The horror film", "The musical numbers", "The villain",
    "This remake", "Ten minutes into the movie", "The opening scene", "The final scene",
    "My friend recommended this movie, and", "The film is set in", "The performances",
    "In the end, the movie", "Overall, this film", "To sum up, the movie",
)


# Film vocabulary: a crude, classifier-free check that a continuation still talks about a film.
FILM_WORDS = re.compile(
    r"\b(movies?|films?|actors?|actress(es)?|act(ing|ed)|plot|scenes?|story|cast|director|characters?|"
    r"watch(ed|ing)?|performances?|script|screen|cinema|audience|viewers?|sequel|roles?)\b", re.IGNORECASE)
CONFIDENT = 0.3   # p(positive) below this: confidently negative


def say(message: str) -> None:
    print(message, flush=True)


# ---- part A: steering by negation ----------------------------------------------------------------
def train_classifier(args, log: dict):
    """MiniLM + LoRA (q, v) + head on IMDB reviews cut to CLF_TOKENS tokens: p(positive)."""
    model, tok, task, data = build_job("minilm", "imdb", seed=args.seed, max_length=args.clf_tokens)
    assert data.labels == ["negative", "positive"], data.labels
    torch.manual_seed(args.seed)
    am = peftlab.adapt(model)
    am.add_adapter("clf", method_config(get_method("lora"), None, 8, train_head=True))
    am.set_active(["clf"])
    am.set_trainable("clf")
    t = time.perf_counter()
    rows = [{"text": r["text"][:1000], "label": r["label"]} for r in data.train]   # long texts: tokeniser time
    result = train(am, "clf", task, rows, None, TrainConfig(
        steps=args.steps_clf, batch_size=16, lr=MODEL_DEFAULTS["minilm"]["lr"], seed=args.seed,
        progress=not args.quiet))
    am.eval()
    test = data.test[: args.eval_size]
    acc = task.evaluate(am, test, 64)["accuracy"]
    log["classifier"] = {"accuracy": acc, "eval_rows": len(test), "max_tokens": args.clf_tokens,
                         "steps": args.steps_clf, "train_s": time.perf_counter() - t,
                         "final_loss": statistics.mean(result.losses[-20:])}
    say(f"   classifier: held-out IMDB accuracy {acc:.4f} on {len(test)} reviews cut to "
        f"{args.clf_tokens} tokens ({time.perf_counter() - t:.0f} s)")
    return am, tok, task


@torch.no_grad()
def p_positive(clf, task: ClassificationTask, texts: list[str]) -> list[float]:
    out = []
    for i in range(0, len(texts), 64):
        batch = task.collate([{"text": t, "label": 0} for t in texts[i:i + 64]])
        batch.pop("labels")
        out += clf(**batch).logits.float().softmax(-1)[:, 1].tolist()
    return out


@torch.no_grad()
def generate(am, tok, prompts: list[str], args) -> list[str]:
    """Sampled continuations (the new text only), batched with left padding; the same seed for
    every model, so the models draw from the same random stream."""
    tok.padding_side = "left"
    torch.manual_seed(args.seed)
    texts = []
    for i in range(0, len(prompts), args.gen_batch):
        chunk = prompts[i:i + args.gen_batch]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        out = am.generate(**enc, do_sample=True, top_p=0.9, temperature=1.0,
                          max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tok.padding_side = "right"
    return texts


@torch.no_grad()
def base_perplexity(am, tok, prompts: list[str], continuations: list[str]) -> float:
    """exp(mean NLL) of the continuation tokens under the base model (adapters off), given the
    opening: the fluency measure of the paper's detoxification experiment."""
    nll, count = 0.0, 0
    with am.disabled():
        for i in range(0, len(prompts), 32):
            seqs, starts = [], []
            for p, c in zip(prompts[i:i + 32], continuations[i:i + 32], strict=True):
                a = tok.encode(p, add_special_tokens=False)
                b = tok.encode(c, add_special_tokens=False)
                seqs.append(a + b)
                starts.append(len(a))
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            target = torch.full_like(ids, -100)
            for j, (s, k) in enumerate(zip(seqs, starts, strict=True)):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
                target[j, k:len(s)] = torch.tensor(s[k:])
            logits = am(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            t = target[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            count += int((t != -100).sum())
    return math.exp(nll / max(count, 1))


def train_lm(am, name: str, config, task, rows, args, log: dict) -> None:
    """A causal-LM LoRA on `rows`, from the seed's LoRA start and data order."""
    torch.manual_seed(args.seed)
    am.add_adapter(name, config)
    am.set_active([name])
    am.set_trainable(name)
    t = time.perf_counter()
    result = train(am, name, task, rows, None, TrainConfig(
        steps=args.steps_a, batch_size=8, lr=args.lr_a, seed=args.seed, progress=not args.quiet))
    am.set_trainable(None)
    log[name] = {"rows": len(rows), "train_s": time.perf_counter() - t,
                 "loss_first": statistics.mean(result.losses[:10]),
                 "loss_last": statistics.mean(result.losses[-10:])}
    say(f"   {name}: {len(rows):,} reviews, loss {log[name]['loss_first']:.3f} → "
        f"{log[name]['loss_last']:.3f} ({log[name]['train_s']:.0f} s)")


def part_a(args, log: dict) -> list[dict]:
    t0 = time.perf_counter()
    say("== A: sentiment classifier (MiniLM, IMDB) ==")
    clf, _, clf_task = train_classifier(args, log)

    say("== A: positive-review LoRA (SmolLM2) ==")
    model, tok = load_model("smollm2", kind="causal-lm")
    data = load_dataset("imdb", seed=args.seed)
    positive = data.labels.index("positive")
    # Only the first MAX_TOKENS tokens are trained on: cut the text first (tokeniser time).
    rows = [{"text": r["text"][:6 * args.max_tokens]} for r in data.train if r["label"] == positive]
    negative_rows = [{"text": r["text"][:6 * args.max_tokens]} for r in data.train if r["label"] != positive]
    task = CausalLMTask(tok, max_length=args.max_tokens)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.top_layers, n_layers)) if args.top_layers else None
    config = peftlab.LoraConfig(r=8, alpha=16, targets=args.targets_a.split(","), layers=layers)
    am = peftlab.adapt(model)
    lm_log: dict = {}
    train_lm(am, "pos", config, task, rows, args, lm_log)
    log["steering_lora"] = {
        "targets": args.targets_a, "layers": layers, "r": 8, "alpha": 16, "steps": args.steps_a,
        "batch_size": 8, "lr": args.lr_a, "max_tokens": args.max_tokens,
        "parameters": am.count_parameters("pos"), **lm_log["pos"]}

    peftlab.negate(am, "pos", name="neg")
    variants = [("base", None), ("pos", "pos"), ("neg = negate(pos)", "neg")]
    for k in args.neg_scales:
        name = f"neg{k:g}"
        peftlab.scale(am, "pos", -k, name=name)
        variants.append((f"scale(pos, −{k:g})", name))
    if args.contrast:
        # The same LoRA start and data order, on the negative reviews; then the paper's
        # subtraction, in which the shared "movie review" part of the two adapters cancels.
        train_lm(am, "negrev", config, task, negative_rows, args, lm_log)
        log["contrast_lora"] = lm_log["negrev"]
        peftlab.subtract(am, "negrev", "pos", name="flip")
        variants += [("negrev (trained on negative reviews)", "negrev"),
                     ("subtract(negrev, pos)", "flip")]
    prompts = [p for p in OPENINGS[: args.openings] for _ in range(args.samples)]
    am.eval()
    out = []
    for label, name in variants:
        t = time.perf_counter()
        if name is None:
            with am.disabled():
                conts = generate(am, tok, prompts, args)
        else:
            am.set_active([name])
            conts = generate(am, tok, prompts, args)
        texts = [p + c for p, c in zip(prompts, conts, strict=True)]
        probs = p_positive(clf, clf_task, texts)
        row = {"model": label, "adapter": name, "n": len(texts),
               "positive_rate": sum(p > 0.5 for p in probs) / len(probs),
               "mean_p_positive": statistics.mean(probs),
               "confident_negative_rate": sum(p < CONFIDENT for p in probs) / len(probs),
               "film_words_rate": sum(bool(FILM_WORDS.search(c)) for c in conts) / len(conts)}
        if not args.no_fluency:
            row["base_perplexity"] = base_perplexity(am, tok, prompts, conts)
        row["seconds"] = time.perf_counter() - t
        row["samples"] = [{"opening": o, "continuation": c, "p_positive": p}
                          for o, c, p in zip(prompts, conts, probs, strict=True)]
        out.append(row)
        say(f"   {label:<22} positive rate {row['positive_rate']:.3f}, mean p(pos) "
            f"{row['mean_p_positive']:.3f}, p(pos) < {CONFIDENT}: {row['confident_negative_rate']:.3f}, "
            f"film words {row['film_words_rate']:.3f}" + (f", base ppl {row['base_perplexity']:.1f}"
                                                 if "base_perplexity" in row else "")
            + f"  ({row['seconds']:.0f} s)")
    log["part_a_seconds"] = time.perf_counter() - t0
    return out


# ---- part B: disjoint halves ----------------------------------------------------------------------
def part_b(args, log: dict) -> list[dict]:
    t0 = time.perf_counter()
    say("== B: disjoint halves (MiniLM, Rotten Tomatoes) ==")
    model, _, task, data = build_job("minilm", "sentiment", seed=args.seed, max_length=96)
    am = peftlab.adapt(model)   # one model: the same base and the same starting head for every adapter
    order = list(range(len(data.train)))
    random.Random(args.seed).shuffle(order)
    half = len(order) // 2
    halves = {"h1": [data.train[i] for i in order[:half]], "h2": [data.train[i] for i in order[half:2 * half]]}
    config = method_config(get_method("lora"), None, 8, train_head=True)
    lr = MODEL_DEFAULTS["minilm"]["lr"]
    test = data.test[: args.eval_size]
    trained = {}
    names = ["h1", "h2"] + ([] if args.no_full else ["all"])
    for name in names:
        rows = data.train if name == "all" else halves[name]
        torch.manual_seed(args.seed)   # the same LoRA start for every adapter
        am.add_adapter(name, config)
        am.set_active([name])
        am.set_trainable(name)
        t = time.perf_counter()
        result = train(am, name, task, rows, None, TrainConfig(
            steps=args.steps_b, batch_size=16, lr=lr, seed=args.seed, progress=not args.quiet))
        am.set_trainable(None)
        trained[name] = {"rows": len(rows), "train_s": time.perf_counter() - t,
                         "final_loss": statistics.mean(result.losses[-20:])}
        say(f"   trained {name} on {len(rows):,} rows ({trained[name]['train_s']:.0f} s)")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftlab.add(am, ["h1", "h2"], [0.5, 0.5], name="avg")
        peftlab.add(am, ["h1", "h2"], [0.5, 0.5], name="avg_param", mode="parameter")
        peftlab.merge_adapters(am, ["h1", "h2"], how="ties", density=0.5, rank=16, name="ties")
        peftlab.add(am, ["h1", "h2"], [1.0, 1.0], name="sum")
    composed_warnings = [str(w.message) for w in caught]
    prov = {n: am.adapters[n].provenance for n in ("avg", "avg_param", "ties", "sum")}
    log["part_b_provenance"] = {n: {k: v for k, v in p.items() if k != "svd_relative_error"}
                                | ({"svd_relative_error_max": p["svd_relative_error"]["max"],
                                    "svd_relative_error_mean": p["svd_relative_error"]["mean"]}
                                   if "svd_relative_error" in p else {})
                                for n, p in prov.items()}
    log["part_b_warnings"] = composed_warnings

    rows_out = []
    labels = {"h1": "h1 (half 1)", "h2": "h2 (half 2)", "avg": "avg: add 0.5/0.5, delta",
              "avg_param": "avg: add 0.5/0.5, parameter", "ties": "ties (density 0.5, rank 16)",
              "sum": "sum: add 1/1, delta", "all": "reference: trained on all rows"}
    am.eval()
    for name in ["h1", "h2", "avg", "avg_param", "ties", "sum"] + ([] if args.no_full else ["all"]):
        t = time.perf_counter()
        am.set_active([name])
        acc = task.evaluate(am, test, 64)["accuracy"]
        rows_out.append({"name": name, "label": labels[name], "accuracy": acc, **trained.get(name, {}),
                         "eval_s": time.perf_counter() - t})
        say(f"   {labels[name]:<32} accuracy {acc:.4f}")
    with am.disabled():
        # the base with its fresh (untrained) head: chance level, for scale
        base_acc = task.evaluate(am, test, 64)["accuracy"]
    log["part_b_base_accuracy"] = base_acc
    log["part_b_eval_rows"] = len(test)
    log["part_b_seconds"] = time.perf_counter() - t0
    return rows_out


# ---- report -----------------------------------------------------------------------------------------
def table(head, body) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in body]]


def report(args, log: dict, a_rows: list[dict], b_rows: list[dict], seconds: float) -> tuple[list[str], dict]:
    lines = ["# Adapter composition: steering by negation (SmolLM2) and averaging disjoint halves (MiniLM)", ""]
    command = "python bench/composition.py" + (" --quick" if args.quick else "")
    lines += [(f"`{command}` (torch {torch.__version__}, 1 thread of a shared 2-core CPU, seed {args.seed}; "
              f"{seconds / 60:.1f} min in all)."), ""]
    verdicts = {}
    if a_rows:
        s, c = log["steering_lora"], log["classifier"]
        where = "every layer" if not s["layers"] else f"layers {s['layers'][0]}-{s['layers'][-1]}"
        contrast = ""
        if "contrast_lora" in log:
            n = log["contrast_lora"]
            contrast = (f" `negrev`: the same LoRA, start and data order trained on the negative reviews "
                        f"({n['rows']:,}; loss {n['loss_first']:.3f} → {n['loss_last']:.3f}); "
                        "`subtract(negrev, pos)` = ΔW_negrev − ΔW_pos, exact (concatenated rank 16).")
        lines += ["## A. Sentiment steering: a positive-review LoRA and its negation", "",
                  (f"`pos`: LoRA r 8 (alpha 16) on {s['targets'].replace(',', ', ')}, {where} of "
                   f"SmolLM2-135M-Instruct, trained as a causal LM on the first {s['max_tokens']} tokens of "
                   f"positive IMDB training reviews ({s['rows']:,} reviews), {s['steps']} steps of batch 8, "
                   f"lr {s['lr']:g}, fp32 (loss {s['loss_first']:.3f} → {s['loss_last']:.3f}, "
                   f"{s['train_s'] / 60:.1f} min). `negate(pos)` = `peftlab.negate(am, \"pos\")` (−ΔW); "
                   f"`scale(pos, −k)` = `peftlab.scale(am, \"pos\", -k)`, the paper's scaled negation." + contrast),
                  "",
                  (f"Generations: {args.openings} neutral review openings × {args.samples} samples = "
                   f"{a_rows[0]['n']} per model, {args.new_tokens} new tokens, top-p 0.9, temperature 1, "
                   f"the same seed for every model. Classifier: MiniLM-L6 + LoRA r 8 (q, v) + head, "
                   f"{c['steps']} steps of batch 16 on IMDB training reviews cut to {c['max_tokens']} tokens; "
                   f"held-out accuracy **{c['accuracy']:.4f}** on {c['eval_rows']} IMDB test reviews (cut "
                   f"alike). Each opening + continuation is scored. Columns: positive rate = share with "
                   f"p(positive) > 0.5; confidently negative = share with p(positive) < {CONFIDENT}; film words = "
                   "share of continuations using a film word (movie, film, actor, plot, scene, story, cast, "
                   "watch, ...; a crude classifier-free on-topic check); base ppl = the base model's "
                   "perplexity of the continuation given the opening (fluency: lower is more fluent by the "
                   "base model's judgement)."), ""]
        head = ("model", "positive rate", "mean p(positive)", f"p(positive) < {CONFIDENT}", "film words",
                "base ppl")
        body = [(r["model"], f"{r['positive_rate']:.3f}", f"{r['mean_p_positive']:.3f}",
                 f"{r['confident_negative_rate']:.3f}", f"{r['film_words_rate']:.3f}",
                 f"{r['base_perplexity']:.1f}" if "base_perplexity" in r else "-") for r in a_rows]
        print()
        print_columns(head, body)
        lines += table(head, body) + [""]
        by = {r["adapter"]: r for r in a_rows}
        base, pos, neg = by[None], by["pos"], by["neg"]
        ok_clf = c["accuracy"] >= 0.75
        ok_order = pos["positive_rate"] > base["positive_rate"] > neg["positive_rate"]
        ok_neg = neg["positive_rate"] < base["positive_rate"]
        verdicts["classifier_reasonable"] = ok_clf
        verdicts["pos_gt_base_gt_neg"] = ok_order
        verdicts["negation_shifts_down"] = ok_neg
        lines += [(f"- Classifier reasonable (held-out accuracy ≥ 0.75): **{'met' if ok_clf else 'not met'}** "
                  f"({c['accuracy']:.4f})."),
                  (f"- Negation shifts the positive rate down (negate(pos) < base): "
                  f"**{'met' if ok_neg else 'not met'}** ({base['positive_rate']:.3f} → {neg['positive_rate']:.3f}; "
                  f"mean p(positive) {base['mean_p_positive']:.3f} → {neg['mean_p_positive']:.3f})."),
                  (f"- Order pos > base > negate(pos): **{'met' if ok_order else 'not met'}** "
                  f"({pos['positive_rate']:.3f} / {base['positive_rate']:.3f} / {neg['positive_rate']:.3f})."),
                  ""]
        if neg["film_words_rate"] < base["film_words_rate"] - 0.1:
            lines += [(f"Caveat: `pos` learned the movie-review domain as well as the sentiment, so its negation "
                       f"also steers away from films: film words in {base['film_words_rate']:.0%} of the base "
                       f"model's continuations, {pos['film_words_rate']:.0%} of pos's, "
                       f"{neg['film_words_rate']:.0%} of negate(pos)'s. Off-topic text scores near p = 0.5, which "
                       f"alone pulls the positive rate down; the confidently negative share (p < {CONFIDENT}: "
                       f"{base['confident_negative_rate']:.3f} → {neg['confident_negative_rate']:.3f}) is the better "
                           "measure of text that reads as negative."), ""]
        lines += ["Two samples per model (the first two openings, first sample of each):", ""]
        for r in a_rows:
            for smp in r["samples"][: 2 * args.samples: args.samples]:
                text = " ".join((smp["opening"] + smp["continuation"]).split()).replace("|", "\\|")
                lines.append(f"- {r['model']} (p {smp['p_positive']:.2f}): {text}")
        lines.append("")
    if b_rows:
        lr = MODEL_DEFAULTS["minilm"]["lr"]
        h = {r["name"]: r for r in b_rows}
        lines += ["## B. Two adapters trained on disjoint halves, composed", "",
                  (f"MiniLM-L6 + Rotten Tomatoes. `h1`, `h2`: LoRA r 8 on attn.q, attn.v with the classification "
                   f"head trained alongside (`modules_to_save=[\"head\"]`), each trained on one half "
                   f"({h['h1']['rows']:,} rows) of the training rows, {args.steps_b} steps of batch 16, lr {lr:g}, "
                   "from the same starting head and LoRA start (one seed) and the same data-order seed. The "
                   "composed adapters' heads are base + Σ w·(head_i − base). Accuracy on the first "
                   f"{log['part_b_eval_rows']} held-out test reviews (base with the untrained head: "
                   f"{log['part_b_base_accuracy']:.4f}). ±1 point is about the sampling noise of 1000 rows "
                   "(binomial s.e. ≈ 1.3 points)."), ""]
        head = ("adapter", "accuracy", "vs min(h1, h2)")
        lo = min(h["h1"]["accuracy"], h["h2"]["accuracy"])
        body = [(r["label"], f"{r['accuracy']:.4f}", f"{100 * (r['accuracy'] - lo):+.1f} pt") for r in b_rows]
        print()
        print_columns(head, body)
        lines += table(head, body) + [""]
        pv = log["part_b_provenance"]
        extra = []
        if "shared_init_cosine" in pv["avg_param"]:
            extra.append(f"parameter mode: mean cosine of the A factors {pv['avg_param']['shared_init_cosine']:.3f} "
                         "(shared start)")
        if "svd_relative_error_max" in pv["ties"]:
            extra.append(f"ties at rank 16: SVD relative error mean {pv['ties']['svd_relative_error_mean']:.3f}, "
                         f"max {pv['ties']['svd_relative_error_max']:.3f}")
        if log["part_b_warnings"]:
            extra.append("warnings: " + "; ".join(log["part_b_warnings"]))
        if extra:
            lines += ["Composition details: " + "; ".join(extra) + ".", ""]
        ok_avg = h["avg"]["accuracy"] >= lo
        verdicts["avg_ge_weaker_half"] = ok_avg
        lines += [(f"- avg (delta) ≥ min(h1, h2): **{'met' if ok_avg else 'not met'}** ({h['avg']['accuracy']:.4f} vs "
                  f"min({h['h1']['accuracy']:.4f}, {h['h2']['accuracy']:.4f}) = {lo:.4f})."),
                  (f"- avg (parameter) ≥ min(h1, h2): **{'met' if h['avg_param']['accuracy'] >= lo else 'not met'}** "
                  f"({h['avg_param']['accuracy']:.4f})."),
                  (f"- ties ≥ min(h1, h2): **{'met' if h['ties']['accuracy'] >= lo else 'not met'}** "
                  f"({h['ties']['accuracy']:.4f}); sum: {h['sum']['accuracy']:.4f}."), ""]
    return lines, verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~3-minute smoke run (numbers mean nothing)")
    ap.add_argument("--parts", default="a,b", help="which parts to run: a, b or a,b")
    ap.add_argument("--steps-a", type=int, default=150, help="steps of the positive-review LoRA")
    ap.add_argument("--lr-a", type=float, default=2e-3)
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens of each review the LM LoRA trains on")
    ap.add_argument("--targets-a", default="attn.q,attn.v")
    ap.add_argument("--top-layers", type=int, default=15,
                    help="adapt only the top N of SmolLM2's 30 layers (backward stops there: faster); 0 = all")
    ap.add_argument("--neg-scales", type=float, nargs="*", default=[2.0],
                    help="k of the extra scaled negations scale(pos, -k)")
    ap.add_argument("--contrast", action="store_true",
                    help="also train a LoRA on negative reviews (negrev) and steer with subtract(negrev, pos) "
                         "(about 10 more minutes)")
    ap.add_argument("--openings", type=int, default=len(OPENINGS))
    ap.add_argument("--samples", type=int, default=2, help="samples per opening")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--gen-batch", type=int, default=48)
    ap.add_argument("--no-fluency", action="store_true", help="skip the base-perplexity measure")
    ap.add_argument("--steps-clf", type=int, default=200)
    ap.add_argument("--clf-tokens", type=int, default=64)
    ap.add_argument("--steps-b", type=int, default=200)
    ap.add_argument("--no-full", action="store_true", help="skip part B's reference adapter trained on all rows")
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/composition")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps_a, args.steps_clf, args.steps_b = 6, 20, 20
        args.openings, args.samples, args.new_tokens, args.eval_size = 8, 1, 12, 200
        args.no_full = True
        if args.out == ap.get_default("out"):
            args.out = "/tmp/composition_quick"
    torch.set_num_threads(1)   # a shared 2-core machine: one thread (two are several times slower here)
    torch.manual_seed(args.seed)
    parts = {p.strip() for p in args.parts.split(",")}
    started = time.perf_counter()
    log: dict = {}
    a_rows = part_a(args, log) if "a" in parts else []
    b_rows = part_b(args, log) if "b" in parts else []
    seconds = time.perf_counter() - started
    lines, verdicts = report(args, log, a_rows, b_rows, seconds)
    env = {"peftlab": peftlab.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           **vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"env": env, "seconds": seconds, "verdicts": verdicts, **log, "part_a": a_rows, "part_b": b_rows},
        indent=2, ensure_ascii=False) + "\n")
    say(f"\n{verdicts}\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
