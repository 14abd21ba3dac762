"""``workbench train-mend``: train a MEND editor for a model (reference §6a).

The editor learns to turn the fine-tuning gradient of an edit into a weight update
(:mod:`workbench.editing.mend_train`). ``--facts toy-train`` (the default for the bundled
model) generates edits about new subjects that are not in the bundled world, phrased with
templates the evaluation never probes (the relations' biography clauses), so the editor never
trains on a fact, prompt or template that ``evaluate`` scores; a CounterFact-style JSON file gives the
training edits otherwise (its rewrite prompts, paraphrase and neighborhood prompts), and must
not contain the facts the editor will be evaluated on. ``--out`` receives ``checkpoint.pt``
(rerunning with the same ``--out`` resumes an interrupted run), ``editor.safetensors`` (the
best editor by validation edit success) and ``report.json`` (time, steps, validation edit
success and locality). The editor shipped for the bundled model is rebuilt with
``workbench train-mend --out assets/mend-toy``.
"""

from __future__ import annotations

from . import add_model_arg


def register(sub) -> None:
    p = sub.add_parser("train-mend", help="train a MEND editor (resumable); the bundled model's ships in assets/",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    add_model_arg(p)
    p.add_argument("--facts", "-f", default=None,
                   help="'toy-train' (generated held-out subjects of the bundled world; default for toy-facts) "
                        "or a CounterFact-style JSON file of training edits")
    p.add_argument("--val-facts", default=None, help="CounterFact-style JSON file of validation edits "
                                                      "(default: 10%% of the training subjects)")
    p.add_argument("--out", "-o", required=True, help="output folder (checkpoints, editor, report; resumable)")
    p.add_argument("--preset", default="auto", help="'auto' (by model), 'toy-facts', 'gpt2-xl', 'gpt-j' or "
                                                    "'default' (the originals' values, last three blocks)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a hyperparameter, e.g. --set lr=1e-5 --set batch_size=8 (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="maximum training steps (overrides max_steps)")
    p.add_argument("--seed", type=int, default=None, help="seed of the network init, batches and split")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def run(args) -> int:
    import json

    import torch

    from ..editing.mend_hparams import MEND_PRESETS, MendHyperParams, mend_hparams_for
    from ..editing.mend_train import TOY_TRAIN, train_mend
    from ..facts import load_facts
    from ..loading import BUNDLED, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    if args.preset == "auto":
        hp = mend_hparams_for(model)
    elif args.preset == "default":
        hp = MendHyperParams()
    elif args.preset in MEND_PRESETS:
        hp = MEND_PRESETS[args.preset]
    else:
        raise ValueError(f"unknown preset {args.preset!r}; choose auto, default or one of {sorted(MEND_PRESETS)}")
    changes = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        changes[key.strip()] = _parse_value(value.strip())
    if args.seed is not None:
        changes["seed"] = args.seed
    hp = MendHyperParams.from_dict({**hp.to_dict(), **changes})
    facts_arg = args.facts or (TOY_TRAIN if args.model == BUNDLED else None)
    if facts_arg is None:
        raise ValueError("--facts is required for models other than the bundled one (a CounterFact-style JSON file)")
    facts = TOY_TRAIN if facts_arg == TOY_TRAIN else load_facts(facts_arg)
    val = load_facts(args.val_facts) if args.val_facts else None
    result = train_mend(model, facts, hparams=hp, out=args.out, val_facts=val, max_steps=args.steps,
                        progress=not args.no_progress, log=print)
    r = result.report
    v = r["validation"] or {}
    print(json.dumps({"steps": r["steps"], "stopped": r["stopped"], "best_step": r["best_step"],
                      "train_seconds": r["train_seconds"], "val_edit_success": v.get("edit_success"),
                      "val_locality": v.get("locality"), "editor_bytes": r["editor_bytes"]}))
    print(f"wrote {args.out}/editor.safetensors and {args.out}/report.json")
    return 0
