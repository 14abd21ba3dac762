"""Training a MEND editor (reference §6a): ``workbench.train_mend`` / ``workbench train-mend``.

The model stays frozen. Each step samples ``batch_size`` training edits; for each, the editor
turns the gradient of the edit loss on the edit prompt into a weight update (one per edit), and
the loss is

    cedit · NLL(new object | equivalent prompt, edited weights)
    + cloc · KL(p_W(· | unrelated prompt) ‖ p_W̃(· | unrelated prompt))   (over its tokens),

averaged over the batch; Adam updates the network (``lr``) and the per-weight steps α
(``lr_lr``), after clipping the gradient norm to ``grad_clip``. Every ``val_every`` steps the
editor is scored on fixed validation edits (edit success on the edit prompt and on an
equivalent prompt, and locality: the unrelated prompt's top token unchanged); the best editor
by ``early_stop_key`` is kept (the lowest validation loss, as the originals; or the highest edit
success, locality breaking ties), and training stops after
``early_stop_patience`` validations without improvement or at ``max_steps``.

Data. A training edit is a :class:`~workbench.facts.Fact` with ``target_new``: its prompt is the
edit prompt, a random one of its ``paraphrases`` the equivalent prompt, a random one of its
``neighborhood`` prompts the unrelated prompt (CounterFact: paraphrase and neighborhood prompts).
For the bundled world, :func:`toy_training_facts` generates **new subjects** that are not in the
world (names of three of its words, while its subjects have two), phrased with **templates the
evaluation never probes** (``templates="held-out"``, :func:`toy_training_templates`): the
relation's biography clauses (``"{} hails from"``), alone or after a biography opener
(``"People say that {} hails from"``). The model read them in its training biographies; the
evaluation's probes (the relation's six templates, :mod:`workbench.perspective`) share none
of them. So no evaluated fact, subject, prompt or template is ever a training edit.
``templates="probes"`` phrases them with the relation's six templates instead (what an earlier
workbench did; kept to compare). ``val_fraction`` of the training facts' subjects are held out of
the training batches for validation.

Checkpoints. ``out/checkpoint.pt`` holds everything the run depends on (editor, both optimisers,
step, best score, patience counter, history, elapsed time) and is replaced atomically every
``checkpoint_every`` steps and at every validation, sealed by a SHA-256
(:func:`workbench.integrity.save_torch`): a damaged checkpoint is an error naming the file.
Batches are drawn from a generator seeded by (seed, step), so a run killed at any point and
restarted with the same ``out`` ends in exactly the state of an uninterrupted run. ``out/editor.safetensors`` is the best editor and
``out/report.json`` the training report.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ..facts import Fact, facts_hash
from ..integrity import load_torch, save_torch
from .common import _pad_id
from .mend import collect_factors, edit_rows, logits_of, target_correct, target_nll
from .mend_hparams import MendHyperParams, mend_hparams_for
from .mend_net import MendEditor

TOY_TRAIN = "toy-train"
"""``facts`` value meaning: generated training subjects of the bundled world (:func:`toy_training_facts`)."""


# ----------------------------------------------------------------------------- data
TRAINING_TEMPLATES = ("held-out", "probes")
"""Phrasings of :func:`toy_training_facts`: ``"held-out"`` (biography clauses, never probed) or
``"probes"`` (the relation's six templates, which the evaluation probes)."""


def toy_training_templates(relation) -> list[str]:
    """Templates of a world relation that the evaluation never probes: each biography clause cut
    before its object (``"{} hails from"``, subject first), and the same after each biography
    opener (``"People say that {} hails from"``)."""
    from ..toyworld.world import _BIO_OPENERS

    clauses = [c.split("{o}")[0].strip() for c in relation.bio_clauses]
    plain = [f"{{}} {c}" for c in clauses]
    return plain + [f"{opener} {t}" for opener in _BIO_OPENERS for t in plain]


def toy_training_facts(world=None, n_subjects: int = 300, seed: int = 0, n_unrelated: int = 6,
                       templates: str = "held-out") -> list[Fact]:
    """Training edits about ``n_subjects`` new subjects of the bundled world, one per relation.

    The subjects are new names made of the world's own words, a first name and two different
    surnames (``"Mira Wilde Thorne"``): every token is one the model was trained on, so the
    editor learns from gradients like those of the world's subjects, yet no training subject is
    a subject of the world (those have one surname). Each (subject, relation) gives one
    :class:`Fact`: a random phrasing as the edit prompt, the relation's other phrasings as
    ``paraphrases``, a random "true" and a different new object, and ``n_unrelated`` prompts
    of other training subjects (any relation) as ``neighborhood``. ``templates``: ``"held-out"``
    phrases everything with :func:`toy_training_templates` (no template the evaluation probes);
    ``"probes"`` with the relation's own six templates. Held-out edit prompts are subject-first
    or opener-first with equal chance.
    """
    from ..loading import bundled_path
    from ..toyworld.world import World

    if templates not in TRAINING_TEMPLATES:
        raise ValueError(f"templates must be one of {TRAINING_TEMPLATES}, not {templates!r}")
    world = world or World.load(str(bundled_path() / "world.json"))
    firsts = sorted({s.split(" ")[0] for s in world.subjects})
    lasts = sorted({s.split(" ")[-1] for s in world.subjects})
    names = [f"{f} {a} {b}" for f in firsts for a in lasts for b in lasts if a != b]
    rng = random.Random(f"mend-subjects-{world.seed}-{seed}")
    subjects = rng.sample(names, n_subjects)
    phrasings = {rel.id: (toy_training_templates(rel) if templates == "held-out" else [t.text for t in rel.templates])
                 for rel in world.relations}
    prompts = [(s, t.format(s)) for s in subjects for rel in world.relations for t in phrasings[rel.id]]
    facts = []
    for s in subjects:
        for rel in world.relations:
            own = phrasings[rel.id]
            if templates == "held-out":  # subject-first (the clauses) or after an opener, equally often
                n_plain = len(rel.bio_clauses)
                k = rng.randrange(n_plain) if rng.random() < 0.5 else rng.randrange(n_plain, len(own))
            else:
                k = rng.randrange(len(own))
            true = rng.choice(rel.objects)
            new = rng.choice([o for o in rel.objects if o != true])
            unrelated = []
            while len(unrelated) < n_unrelated:
                other, p = prompts[rng.randrange(len(prompts))]
                if other != s:
                    unrelated.append(p)
            facts.append(Fact(subject=s, template=own[k], target_true=true, target_new=new,
                              relation_id=rel.id, id=f"mend-train-{len(facts)}",
                              paraphrases=tuple(t.format(s) for j, t in enumerate(own) if j != k),
                              neighborhood=tuple(unrelated)))
    return facts


def training_templates(facts: Sequence[Fact]) -> set[str]:
    """Every template the training edits use: edit prompts, equivalent prompts and unrelated
    prompts, with their subject (any training subject, for unrelated prompts) as ``{}``."""
    subjects = sorted({f.subject for f in facts}, key=len, reverse=True)
    out: set[str] = set()
    for f in facts:
        out.add(f.template)
        out.update(p.replace(f.subject, "{}") for p in f.paraphrases)
        for p in f.neighborhood:
            s = next((s for s in subjects if s in p), None)
            if s is not None:
                out.add(p.replace(s, "{}"))
    return out


def probe_templates(facts: Sequence[Fact]) -> set[str]:
    """Every template the evaluation probes for ``facts`` (both phrasing families of each fact,
    :func:`workbench.perspective.phrasings`; bleed and locality use the same templates)."""
    from ..perspective import phrasings

    out: set[str] = set()
    for f in facts:
        ph = phrasings(f)
        out.update(p.replace(f.subject, "{}") for p in (*ph.entity, *ph.relation) if p.count(f.subject) == 1)
    return out


@dataclass(frozen=True)
class MendExample:
    """One training or validation edit: edit prompt -> target, an equivalent and an unrelated prompt."""

    edit_prompt: str
    target: str
    equiv_prompt: str
    loc_prompt: str


def _example(fact: Fact, rng: random.Random, pool: Sequence[Fact]) -> MendExample:
    if fact.target_new is None:
        raise ValueError(f"fact {fact.id} ({fact.prompt!r}) has no target_new; MEND trains on edits")
    equiv = rng.choice(fact.paraphrases) if fact.paraphrases else fact.prompt
    if fact.neighborhood:
        loc = rng.choice(fact.neighborhood)
    else:
        others = [f for f in pool if f.subject != fact.subject] or list(pool)
        loc = rng.choice(others).prompt
    return MendExample(fact.prompt, fact.target_new, equiv, loc)


def split_facts(facts: Sequence[Fact], val_fraction: float, seed: int) -> tuple[list[Fact], list[Fact]]:
    """(train, validation) by subject: ``val_fraction`` of the subjects, seeded, go to validation."""
    subjects = sorted({f.subject for f in facts})
    n_val = max(1, int(round(val_fraction * len(subjects)))) if len(subjects) > 1 else 0
    held = set(random.Random(f"mend-split-{seed}").sample(subjects, n_val))
    train = [f for f in facts if f.subject not in held]
    val = [f for f in facts if f.subject in held]
    if not train:
        raise ValueError("no training facts left after the validation split")
    return train, val or train


def batch_examples(facts: Sequence[Fact], batch_size: int, seed: int, step: int) -> list[MendExample]:
    """The training batch of ``step``: a function of (seed, step) only, so resuming replays it."""
    rng = random.Random(f"mend-batch-{seed}-{step}")
    picks = rng.sample(range(len(facts)), min(batch_size, len(facts)))
    return [_example(facts[i], rng, facts) for i in picks]


def validation_examples(facts: Sequence[Fact], n: int, seed: int) -> list[MendExample]:
    rng = random.Random(f"mend-val-{seed}")
    picks = sorted(rng.sample(range(len(facts)), min(n, len(facts))))
    return [_example(facts[i], rng, facts) for i in picks]


# ----------------------------------------------------------------------------- one step
def _prompt_rows(model, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    from ..spans import tokenize

    rows = [list(tokenize(model, p).ids) for p in prompts]
    return rows, [len(r) for r in rows]


def edit_losses(model, editor: MendEditor, modules, examples: Sequence[MendExample], *, score: bool = False
                ) -> dict[str, torch.Tensor]:
    """The MEND losses of a batch of edits (each edit changes the weights for its own rows only).

    Returns ``loss``, ``edit`` (NLL on the equivalent prompts), ``loc`` (KL on the unrelated
    prompts); with ``score``, also per-edit ``edit_ok`` (edit prompt), ``equiv_ok`` and ``loc_ok``.
    """
    hp = editor.hparams
    b = len(examples)
    dev = model.cfg.device
    edit = edit_rows(model, [(e.edit_prompt, e.target) for e in examples])
    factors, _ = collect_factors(model, editor.weights, modules, edit, hp.factor_positions)
    tf = editor.transform(factors)

    outer_pairs = [(e.equiv_prompt, e.target) for e in examples]
    if score:
        outer_pairs = [(e.edit_prompt, e.target) for e in examples] + outer_pairs
    outer = edit_rows(model, outer_pairs)
    loc_rows, loc_len = _prompt_rows(model, [e.loc_prompt for e in examples])
    width = max(outer.ids.shape[1], max(loc_len))
    ids = torch.full((outer.ids.shape[0] + b, width), _pad_id(model), dtype=torch.long, device=dev)
    ids[: outer.ids.shape[0], : outer.ids.shape[1]] = outer.ids
    for i, r in enumerate(loc_rows):
        ids[outer.ids.shape[0] + i, : len(r)] = torch.tensor(r, device=dev)
    n_outer = outer.ids.shape[0]
    with torch.no_grad():
        base = logits_of(model, ids[n_outer:]).float()
    row_edit = torch.arange(b, device=dev).repeat(n_outer // b + 1)
    with editor.edited(modules, tf, row_edit):
        logits = logits_of(model, ids).float()
    nll = target_nll(logits[:n_outer], outer)
    mask = torch.zeros(b, width, device=dev)
    for i, n in enumerate(loc_len):
        mask[i, :n] = 1
    base_lp = torch.log_softmax(base, -1)
    post_lp = torch.log_softmax(logits[n_outer:], -1)
    kl_tok = (base_lp.exp() * (base_lp - post_lp)).sum(-1)
    kl = (kl_tok * mask).sum() / mask.sum()
    equiv_nll = nll[-b:].mean()
    out = {"loss": hp.cedit * equiv_nll + hp.cloc * kl, "edit": equiv_nll, "loc": kl}
    if score:
        ok = target_correct(logits[:n_outer], outer)
        last = torch.tensor(loc_len, device=dev) - 1
        arange = torch.arange(b, device=dev)
        out["edit_ok"] = ok[:b]
        out["equiv_ok"] = ok[b:]
        out["loc_ok"] = base[arange, last].argmax(-1) == logits[n_outer:][arange, last].argmax(-1)
        out["edit_prompt_nll"] = nll[:b].mean()
    return out


@torch.no_grad()
def validate(model, editor: MendEditor, modules, examples: Sequence[MendExample], batch_size: int = 32
             ) -> dict[str, float]:
    """Validation edit success (edit prompt, equivalent prompt, their mean), locality and losses."""
    was = editor.training
    editor.eval()
    sums: dict[str, float] = {}
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            res = edit_losses(model, editor, modules, chunk, score=True)
            for k in ("loss", "edit", "loc", "edit_prompt_nll"):
                sums[k] = sums.get(k, 0.0) + float(res[k]) * len(chunk)
            for k in ("edit_ok", "equiv_ok", "loc_ok"):
                sums[k] = sums.get(k, 0.0) + float(res[k].float().sum())
    finally:
        editor.train(was)
    n = len(examples)
    out = {k: v / n for k, v in sums.items()}
    return {"edit_success": (out["edit_ok"] + out["equiv_ok"]) / 2, "reliability": out["edit_ok"],
            "generality": out["equiv_ok"], "locality": out["loc_ok"], "loss": out["loss"],
            "edit_nll": out["edit"], "edit_prompt_nll": out["edit_prompt_nll"], "loc_kl": out["loc"], "n": n}


# ----------------------------------------------------------------------------- training
@dataclass
class MendTrainResult:
    """The trained (best) editor and the training report (also ``out/report.json``)."""

    editor: MendEditor
    report: dict


def _better(score: dict, best: dict | None, key: str = "loss") -> bool:
    """Whether ``score`` beats ``best`` by ``key`` (:data:`~workbench.editing.mend_hparams.EARLY_STOP_KEYS`)."""
    if best is None:
        return True
    if key == "loss":
        return score["loss"] < best["loss"]
    return (score["edit_success"], score["locality"]) > (best["edit_success"], best["locality"])


def train_mend(model, facts: Sequence[Fact] | str = TOY_TRAIN, *, hparams: MendHyperParams | dict | None = None,
               out: str | os.PathLike, val_facts: Sequence[Fact] | None = None, val_fraction: float = 0.1,
               max_steps: int | None = None, progress: bool = True, log=None) -> MendTrainResult:
    """Train a MEND editor for ``model`` on ``facts``; resumable, with checkpoints in ``out``.

    Args:
        facts: training edits (:class:`Fact` with ``target_new``, ``paraphrases`` and ideally
            ``neighborhood``), or ``"toy-train"`` for :func:`toy_training_facts` (bundled model).
            They must not include facts used to evaluate the editor.
        hparams: :class:`MendHyperParams` or a dict of its fields (default: the model's preset).
        out: folder for ``checkpoint.pt``, ``editor.safetensors`` (the best editor) and
            ``report.json``; rerunning with the same ``out`` resumes, and a finished run returns
            its result at once. Another model or other settings in ``out`` are an error.
        val_facts: validation edits (default: ``val_fraction`` of the training subjects).
        max_steps: overrides ``hparams.max_steps``.
        log: a callable taking one line of text (progress messages besides the bar).
    """
    from ..spans import bos_convention
    from .hparams import editing_prepend_bos

    hp = hparams if isinstance(hparams, MendHyperParams) else (
        MendHyperParams.from_dict(hparams) if isinstance(hparams, dict) else mend_hparams_for(model))
    if max_steps is not None:
        hp = replace(hp, max_steps=int(max_steps))
    hp = replace(hp, prepend_bos=editing_prepend_bos(model, hp.prepend_bos))
    with bos_convention(model, hp.prepend_bos):
        return _train(model, facts, hp, Path(out), val_facts, val_fraction, progress, log)


def _train(model, facts, hp: MendHyperParams, out: Path, val_facts, val_fraction: float, progress: bool, log
           ) -> MendTrainResult:
    from ..progress import progress_bar

    from ..loading import model_fingerprint

    data_name = facts if isinstance(facts, str) else "facts"
    overlap: dict = {}
    if isinstance(facts, str):
        if facts != TOY_TRAIN:
            raise ValueError(f"facts must be a list of Facts or {TOY_TRAIN!r}, got {facts!r}")
        facts = toy_training_facts(seed=hp.seed)
        from ..facts import load_facts

        used = training_templates(facts)
        overlap = {"templates": "held-out", "training_templates": len(used),
                   "probe_templates_shared": len(used & probe_templates(load_facts("toy-facts")))}
    facts = list(facts)
    if not facts:
        raise ValueError("no training facts")
    if val_facts is None:
        train_facts, val_list = split_facts(facts, val_fraction, hp.seed)
    else:
        train_facts, val_list = facts, list(val_facts)
    val_ex = validation_examples(val_list, hp.n_val, hp.seed)

    out.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    editor = MendEditor.for_model(model, hp)
    hp = editor.hparams  # inner_params resolved
    signature = {"hparams": hp.to_dict(), "model_fingerprint": fingerprint,
                 "train_facts": facts_hash(train_facts), "val_facts": facts_hash(val_list)}
    modules = editor.check_model(model, fingerprint=False)
    net_params = [p for n, p in editor.named_parameters() if n != "alphas"]
    opt = torch.optim.Adam(net_params, lr=hp.lr)
    lr_opt = torch.optim.Adam([editor.alphas], lr=hp.lr_lr)
    ckpt_path = out / "checkpoint.pt"
    state = {"step": 0, "best": None, "best_step": None, "bad_rounds": 0, "history": [], "elapsed_s": 0.0,
             "done": False, "stopped": None}
    if ckpt_path.exists():
        saved = load_torch(ckpt_path, what="MEND training checkpoint", map_location=model.cfg.device,
                           fix=f"delete it (or the whole folder {out}) to train from the start, or use another --out")
        if saved["signature"] != signature:
            diff = [k for k in signature if saved["signature"].get(k) != signature[k]]
            raise RuntimeError(f"{out} holds a MEND run with other {', '.join(diff)}; use a fresh --out folder "
                               "(or the same settings to resume)")
        editor.load_state_dict(saved["editor"])
        opt.load_state_dict(saved["opt"])
        lr_opt.load_state_dict(saved["lr_opt"])
        state = saved["state"]
    say = log or (lambda line: None)
    if state["step"]:
        say(f"resuming from step {state['step']} ({out})")

    def checkpoint() -> None:
        save_torch(ckpt_path, {"signature": signature, "editor": editor.state_dict(), "opt": opt.state_dict(),
                    "lr_opt": lr_opt.state_dict(), "state": state}, what="MEND training checkpoint")

    def finish() -> MendTrainResult:
        best = MendEditor.load(out / "best.safetensors", device=model.cfg.device) \
            if (out / "best.safetensors").exists() else editor
        report = {
            "model": getattr(model, "workbench_spec", None), "model_fingerprint": fingerprint,
            "hparams": hp.to_dict(), "data": {"facts": data_name, "n_train_facts": len(train_facts),
                                              "n_val_facts": len(val_list), "n_val_edits": len(val_ex), **overlap},
            "steps": state["step"], "stopped": state["stopped"], "best_step": state["best_step"],
            "validation": state["best"], "train_seconds": round(state["elapsed_s"], 1),
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "editor_parameters": best.n_parameters(), "history": state["history"],
        }
        best.info = {"training": {k: report[k] for k in ("steps", "best_step", "validation", "train_seconds",
                                                           "data", "stopped")}}
        path = best.save(out / "editor.safetensors")
        best.source = str(path)
        report["editor_bytes"] = path.stat().st_size
        (out / "report.json").write_text(json.dumps(report, indent=1))
        best.eval()
        return MendTrainResult(best, report)

    if state["done"]:
        return finish()

    editor.train()
    bar = progress_bar(total=hp.max_steps, initial=state["step"], desc="train-mend", enabled=progress,
                       dynamic_ncols=True)
    t_start, elapsed0 = time.perf_counter(), state["elapsed_s"]
    try:
        while state["step"] < hp.max_steps:
            step = state["step"]
            examples = batch_examples(train_facts, hp.batch_size, hp.seed, step)
            losses = edit_losses(model, editor, modules, examples)
            if not math.isfinite(losses["loss"].item()):
                raise FloatingPointError(f"MEND loss became {losses['loss'].item()} at step {step}")
            opt.zero_grad()
            lr_opt.zero_grad()
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(list(editor.parameters()), hp.grad_clip)
            opt.step()
            lr_opt.step()
            state["step"] = step + 1
            state["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss'].item():.3f}", edit=f"{losses['edit'].item():.3f}",
                            loc=f"{losses['loc'].item():.4f}", refresh=False)
            validated = state["step"] % hp.val_every == 0 or state["step"] == hp.max_steps
            if validated:
                score = validate(model, editor, modules, val_ex, batch_size=max(hp.batch_size, 32))
                score["step"] = state["step"]
                score["elapsed_s"] = round(elapsed0 + time.perf_counter() - t_start, 1)
                state["history"].append(score)
                if _better(score, state["best"], hp.early_stop_key):
                    state["best"], state["best_step"], state["bad_rounds"] = score, state["step"], 0
                    editor.save(out / "best.safetensors")
                else:
                    state["bad_rounds"] += 1
                say(f"step {state['step']}: validation edit success {score['edit_success']:.3f} "
                    f"(edit prompt {score['reliability']:.3f}, equivalent {score['generality']:.3f}), "
                    f"locality {score['locality']:.3f}, edit NLL {score['edit_nll']:.3f}, KL {score['loc_kl']:.4f}")
                if state["bad_rounds"] >= hp.early_stop_patience:
                    state["stopped"] = "early"
                    break
            state["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
            if validated or state["step"] % hp.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()
    state["stopped"] = state["stopped"] or "max_steps"
    state["done"] = True
    state["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
    checkpoint()
    return finish()
