"""Train the bundled toy model (GPT-2 architecture) on the synthetic world of facts.

``python -m workbench.toyworld.train --out assets/toy-facts`` reproduces the bundle:
the world and tokenizer are identical for the same seed, and the weights are
deterministic on the same hardware.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Any, Sequence

import torch

from .world import BOS, SENTENCE_SEP, World, leaked_held_out, make_world

BUNDLE_SEED = 1
"""The seed of the shipped bundle (world and training); see docs/results.md for why this one."""

DEFAULTS: dict[str, Any] = dict(
    n_subjects=400, held_out_fraction=0.2, names="combination", n_first=20, n_last=20,
    vocab_size=1200,
    n_layer=6, n_embd=128, n_head=4, n_positions=128,
    seq_len=128, batch_size=32, steps=6000, lr=3e-3, warmup=100, weight_decay=0.01,
    min_lr_ratio=0.1, bio_per_subject=5, templates_per_fact=3, eval_every=500, threads=2,
)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(world: World, vocab_size: int = 1200):
    """Byte-level BPE (GPT-2 style) trained on the world's text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(world.tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                   unk_token=BOS, pad_token=BOS)
    fast.model_max_length = DEFAULTS["n_positions"]
    return fast


def check_objects_single_token(world: World, tokenizer) -> None:
    """Assert every object is exactly one token when preceded by a space."""
    bad = {o: tokenizer.tokenize(" " + o) for r in world.relations for o in r.objects
           if len(tokenizer.encode(" " + o, add_special_tokens=False)) != 1}
    assert not bad, f"objects that are not single tokens: {bad}"


def subject_token_counts(world: World, tokenizer) -> dict[str, dict[int, int]]:
    """Distribution of subject lengths in tokens, after a space and at the prompt start."""
    out: dict[str, dict[int, int]] = {}
    for key, prefix in (("after_space", " "), ("at_start", "")):
        counts: dict[int, int] = {}
        for s in world.subjects:
            n = len(tokenizer.encode(prefix + s, add_special_tokens=False))
            counts[n] = counts.get(n, 0) + 1
        out[key] = dict(sorted(counts.items()))
    return out


# --------------------------------------------------------------------------- data


def pack_units(unit_ids: Sequence[list[int]], bos_id: int, sep_id: int, seq_len: int,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack tokenized units into BOS-started sequences separated by ``sep``; pad the rest.

    Returns (input_ids, labels) of shape (n_seq, seq_len); padding labels are -100.
    """
    seqs: list[list[int]] = []
    cur = [bos_id]
    for ids in unit_ids:
        ids = ids[: seq_len - 1]
        extra = ids if len(cur) == 1 else [sep_id] + ids
        if len(cur) + len(extra) > seq_len:
            seqs.append(cur)
            cur, extra = [bos_id], ids
        cur += extra
    seqs.append(cur)
    inp = torch.full((len(seqs), seq_len), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), seq_len), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        inp[i, : len(s)] = torch.tensor(s)
        lab[i, : len(s)] = torch.tensor(s)
    return inp, lab


def epoch_batches(world: World, tokenizer, epoch: int, seed: int, cfg: dict[str, Any]):
    """Tokenized, packed and shuffled training sequences for one pass over the text."""
    units = world.training_text(seed=seed, bio_per_subject=cfg["bio_per_subject"],
                                templates_per_fact=cfg["templates_per_fact"], epoch=epoch)
    ids = tokenizer(units, add_special_tokens=False)["input_ids"]
    sep_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(SENTENCE_SEP))[0]
    inp, lab = pack_units(ids, tokenizer.bos_token_id, sep_id, cfg["seq_len"],
                          tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(inp), generator=g)
    return inp[perm], lab[perm]


def batch_stream(world: World, tokenizer, seed: int, cfg: dict[str, Any]):
    """Endless deterministic stream of (input_ids, labels) batches."""
    epoch = 0
    bs = cfg["batch_size"]
    while True:
        inp, lab = epoch_batches(world, tokenizer, epoch, seed, cfg)
        for i in range(0, len(inp) - bs + 1, bs):
            yield inp[i:i + bs], lab[i:i + bs]
        epoch += 1


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def prompt_accuracy(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                    device: str | torch.device = "cpu", batch_size: int = 1024) -> float:
    """Top-1 accuracy of the first token of `` target`` after BOS + prompt (batched)."""
    if not prompts:
        return float("nan")
    model.eval()
    tgt = torch.tensor([tokenizer.encode(" " + t, add_special_tokens=False)[0] for t in targets])
    correct = 0
    for i in range(0, len(prompts), batch_size):
        preds = last_token_argmax(model, tokenizer, prompts[i:i + batch_size], device)
        correct += int((preds == tgt[i:i + batch_size]).sum())
    return correct / len(prompts)


@torch.no_grad()
def last_token_argmax(model, tokenizer, prompts: Sequence[str],
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Argmax next token after each BOS-prefixed prompt (right padding, one forward)."""
    ids = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False)
           for p in prompts]
    n = max(len(x) for x in ids)
    inp = torch.full((len(ids), n), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for j, x in enumerate(ids):
        inp[j, : len(x)] = torch.tensor(x)
        mask[j, : len(x)] = 1
    logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
    last = mask.sum(1) - 1
    return logits[torch.arange(len(ids)), last.to(device)].argmax(-1).cpu()


def evaluate(model, tokenizer, world: World, device, sample: int | None = None,
             seed: int = 0) -> dict[str, float]:
    """Accuracies on training prompts, held-out phrasings and neighborhood prompts."""
    train = world.prompts("train")
    if sample is not None and sample < len(train):
        train = random.Random(seed).sample(train, sample)
    held = world.prompts("held_out")
    res = {
        "train_prompts": prompt_accuracy(model, tokenizer, [p["prompt"] for p in train],
                                         [p["target"] for p in train], device),
        "held_out_phrasings": prompt_accuracy(model, tokenizer, [p["prompt"] for p in held],
                                              [p["target"] for p in held], device),
        "n_train_prompts": len(train), "n_held_out_prompts": len(held),
    }
    for kind in ("relation_first", "subject_first"):
        sub = [p for p in train if p["kind"] == kind]
        res[f"train_{kind}"] = prompt_accuracy(model, tokenizer, [p["prompt"] for p in sub],
                                               [p["target"] for p in sub], device)
    if sample is None:
        cf = world.counterfact_records()
        nb = [(p, t) for r in cf for p, t in zip(r["neighborhood_prompts"],
                                                  r["neighborhood_targets"])]
        res["neighborhood"] = prompt_accuracy(model, tokenizer, [p for p, _ in nb],
                                              [t for _, t in nb], device)
        res["n_neighborhood_prompts"] = len(nb)
    return res


# --------------------------------------------------------------------------- training


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_model(tokenizer, cfg: dict[str, Any]):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg["n_positions"], n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    frac = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * cos)


def train_model(model, tokenizer, world: World, cfg: dict[str, Any], seed: int,
                device: torch.device) -> list[dict[str, float]]:
    """The optimisation loop; returns the periodic log."""
    from ..progress import progress_bar

    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-8)
    use_bf16 = device.type == "cuda"
    log: list[dict[str, float]] = []
    stream = batch_stream(world, tokenizer, seed, cfg)
    bar = progress_bar(range(cfg["steps"]), desc="train-toy", mininterval=5)
    t0 = time.time()
    for step in bar:
        inp, lab = next(stream)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=inp.to(device), labels=lab.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            acc = evaluate(model, tokenizer, world, device, sample=1000, seed=step)
            entry = {"step": step + 1, "loss": round(loss.item(), 4),
                     "elapsed_s": round(time.time() - t0, 1),
                     **{k: round(v, 4) for k, v in acc.items() if isinstance(v, float)}}
            log.append(entry)
            bar.write(json.dumps(entry))
            model.train()
    return log


def train_toy(out_dir: str, seed: int = BUNDLE_SEED, steps: int | None = None, device: str | None = None,
              **overrides: Any) -> dict[str, Any]:
    """Build the world and tokenizer, train the model, evaluate and save the bundle."""
    cfg = {**DEFAULTS, **overrides}
    if steps is not None:
        cfg["steps"] = steps
    t_start = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    dev = pick_device(device)
    if dev.type == "cpu" and cfg["threads"]:
        torch.set_num_threads(cfg["threads"])  # a fixed count: the same weights on the same CPU
    world = make_world(seed, n_subjects=cfg["n_subjects"],
                       held_out_fraction=cfg["held_out_fraction"], names=cfg["names"],
                       n_first=cfg["n_first"], n_last=cfg["n_last"])
    tokenizer = build_tokenizer(world, cfg["vocab_size"])
    check_objects_single_token(world, tokenizer)
    leaks = leaked_held_out(world, world.training_text(seed=seed))
    assert not leaks, f"held-out phrasings leak into the training text: {leaks[:3]}"
    model = make_model(tokenizer, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device={dev} params={n_params} vocab={len(tokenizer)} subjects={len(world.subjects)}")
    t_train = time.time()
    log = train_model(model, tokenizer, world, cfg, seed, dev)
    train_s = time.time() - t_train
    t_eval = time.time()
    acc = evaluate(model, tokenizer, world, dev)
    eval_s = time.time() - t_eval
    model.to("cpu").float()
    report = {
        "seed": seed, "hyperparameters": cfg, "device": str(dev), "n_params": n_params,
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "accuracy": acc, "train_log": log, "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "subject_token_counts": subject_token_counts(world, tokenizer),
        "n_subjects": len(world.subjects), "n_relations": len(world.relations),
        "n_held_out_subjects": len(world.held_out_subjects),
        "command": f"python -m workbench.toyworld.train --out {out_dir} --seed {seed} "
                   f"--steps {cfg['steps']}",
    }
    save_bundle(out_dir, model, tokenizer, world, report, dev)
    report["total_seconds"] = round(time.time() - t_start, 1)
    _write_json(os.path.join(out_dir, "train_report.json"), report, indent=1)
    print(json.dumps({"accuracy": acc, "train_seconds": report["train_seconds"]}, indent=1))
    return report


def known_with_predictions(model, tokenizer, world: World, device) -> list[dict[str, Any]]:
    """known_1000 records whose prediction is the model's top-1 token (kept when correct)."""
    recs = world.known_records(n=None)
    preds = []
    for i in range(0, len(recs), 1024):
        preds += last_token_argmax(model, tokenizer, [r["prompt"] for r in recs[i:i + 1024]],
                                   device).tolist()
    out = []
    for r, p in zip(recs, preds):
        pred = tokenizer.decode([p]).strip()
        if pred == r["attribute"]:
            out.append({**r, "prediction": pred})
    rng = random.Random(f"known-sample-{world.seed}")
    out = sorted(rng.sample(out, min(1000, len(out))), key=lambda r: r["known_id"])
    for i, r in enumerate(out):
        r["known_id"] = i
    return out


def save_bundle(out_dir: str, model, tokenizer, world: World, report: dict[str, Any],
                device) -> None:
    """Write model, tokenizer, world, CounterFact and known records into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    from ..loading import write_manifest

    write_manifest(out_dir)
    with open(os.path.join(out_dir, "world.json"), "w", encoding="utf-8") as f:
        f.write(world.to_json())
    _write_json(os.path.join(out_dir, "counterfact.json"), world.counterfact_records())
    _write_json(os.path.join(out_dir, "known_1000.json"),
                known_with_predictions(model, tokenizer, world, "cpu"))


def _write_json(path: str, obj: Any, indent: int | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``workbench train-toy --out DIR [--seed N] [--steps N] [--device D]``."""
    ap = argparse.ArgumentParser(prog="train-toy", description=__doc__)
    ap.add_argument("--out", required=True, help="output folder (e.g. assets/toy-facts)")
    ap.add_argument("--seed", type=int, default=BUNDLE_SEED, help=f"world and training seed (default {BUNDLE_SEED}: the bundle's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: auto)")
    ap.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                    help="CPU threads (0: torch default); the bundle used 2")
    args = ap.parse_args(argv)
    train_toy(args.out, seed=args.seed, steps=args.steps, device=args.device,
              threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
