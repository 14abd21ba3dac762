"""``workbench edit``: rewrite one fact with ROME or MEMIT and show predictions before and after."""

from __future__ import annotations

from . import add_bos_arg, add_model_arg, add_presets_arg, add_stats_arg, positive_int


def register(sub) -> None:
    p = sub.add_parser("edit", help="edit one fact (ROME/MEMIT) and print the prompt's predictions before and after")
    add_model_arg(p)
    p.add_argument("--subject", "-s", required=True, help="the subject, e.g. 'Danielle Darrieux'")
    p.add_argument("--prompt", "-p", required=True,
                   help="the prompt with {} where the subject goes, e.g. 'The mother tongue of {} is'")
    p.add_argument("--new-object", "-o", required=True, help="the new object, e.g. 'English'")
    p.add_argument("--method", choices=["rome", "memit"], default="rome", help="editing method (default rome)")
    p.add_argument("--locus", choices=["subject", "relation"], default="subject",
                   help="key the edit at the subject's last token (default) or the relation's last token")
    p.add_argument("--layer", type=int, action="append", default=None,
                   help="layer(s) to edit (repeat for MEMIT); default: the model's preset")
    p.add_argument("--corpus", default=None,
                   help="covariance corpus: a text file, a datasets name, or 'toy-facts' (default for the bundled model)")
    p.add_argument("--n-tokens", type=int, default=None, help="tokens for the covariance statistics")
    p.add_argument("--cache-dir", default=None, help="covariance cache folder (default: the user cache dir)")
    p.add_argument("--save", default=None, metavar="EDIT.safetensors", help="write the edit (deltas + metadata)")
    p.add_argument("--save-model", default=None, metavar="DIR", help="write the edited model as a Hugging Face folder")
    p.add_argument("--overwrite", action="store_true",
                   help="let --save-model replace the model files of a non-empty folder")
    p.add_argument("-k", type=positive_int, default=5, help="how many predictions to show (default 5)")
    add_bos_arg(p)
    add_presets_arg(p)
    add_stats_arg(p)
    p.set_defaults(func=run)


def _show(model, prompt: str, k: int, title: str, prepend_bos: bool | None = None) -> None:
    from ..predict import top_tokens

    print(f"{title}: {prompt!r} ->")
    for token, prob in top_tokens(model, prompt, k=k, prepend_bos=prepend_bos):
        print(f"  {prob:7.2%}  {token!r}")


def run(args) -> int:
    from ..editing import memit, rome
    from ..editing.hparams import editing_prepend_bos
    from ..editing.presets import resolve
    from ..editing.stats import layer_stats, npz_layer_stats
    from ..loading import load_model

    from ..facts import check_template

    check_template(args.prompt, "--prompt")
    if args.save:  # before the edit is computed: a path that cannot be written fails now, not after minutes
        from ..integrity import check_writable

        check_writable(args.save, what="edit file")
    if args.save_model and not args.overwrite:
        from pathlib import Path

        out = Path(args.save_model)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--save-model {out} is {'a file' if not out.is_dir() else 'not empty'}; give a new or "
                             f"empty folder, or pass --overwrite to replace the model files in it")
    model = load_model(args.model, device=args.device)
    request = {"prompt": args.prompt, "subject": args.subject, "target_new": {"str": args.new_object}}
    prompt = args.prompt.format(args.subject)
    chosen = resolve(args.method, model, overrides={"layers": args.layer, "mom2_n_tokens": args.n_tokens,
                                                    "mom2_dataset": args.corpus})
    hp = chosen.hparams
    print(f"model: {(chosen.identity.label if chosen.identity else '-')}; {args.method.upper()} preset {chosen.preset}")
    stats = None
    if args.stats_npz:
        stats = {l: npz_layer_stats(args.stats_npz, l, model) for l in hp.layers}
    elif hp.mom2_adjustment:
        stats = {l: layer_stats(model, l, corpus=hp.mom2_dataset, n_tokens=hp.mom2_n_tokens, cache_dir=args.cache_dir)
                 for l in hp.layers}
    bos = editing_prepend_bos(model, args.prepend_bos, hp.prepend_bos)
    _show(model, prompt, args.k, "before", bos)
    if args.method == "rome":
        edit = rome(model, request, locus=args.locus, hparams=hp, stats=stats, prepend_bos=bos)
    else:
        edit = memit(model, [request], locus=args.locus, hparams=hp, stats=stats, prepend_bos=bos)
    norms = ", ".join(f"{n}: {v:.4g}" for n, v in edit.norms().items())
    print(f"{args.method.upper()} edit ({args.locus} locus) at layers {hp.layers}, "
          f"{'with' if bos else 'without'} BOS; delta norms {norms}")
    with edit.applied(model):
        _show(model, prompt, args.k, "after", bos)
        if args.save_model:
            from ..loading import save_hf

            print(f"edited model written to {save_hf(model, args.save_model, overwrite=args.overwrite)}")
    if args.save:
        print(f"edit written to {edit.save(args.save)}")
    return 0
