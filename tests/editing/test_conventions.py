"""The BOS convention of the originals (never prepended) and MEMIT's own context templates."""

from __future__ import annotations

import pytest
import torch

from workbench.editing import ft, kn, memit, rome
from workbench.editing.context import MEMIT_SEED_WORDS, context_templates
from workbench.editing.hparams import (MEMIT_GPT2_XL, MEMIT_GPT_J, MEMIT_TOY, ROME_GPT2_XL, ROME_GPT_J, ROME_TOY,
                                       editing_prepend_bos, memit_hparams_for)
from workbench.facts import Fact
from workbench import identity
from workbench.loading import assets_dir, hf_model, random_model
from workbench.spans import bos_convention, default_prepend_bos

# these edits take a step or two on a random model: they are about token ids, not about reaching
pytestmark = pytest.mark.filterwarnings("ignore::workbench.editing.edit.EditNotReachedWarning")

FACT = Fact(subject="Miles Davis", template="{} plays the", target_true=" trumpet", target_new=" guitar",
            paraphrases=("Miles Davis is a master of the",))
HP = {"context_templates": ["{}"], "v_num_grad_steps": 2, "mom2_adjustment": False}


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The bundled tokenizer as plain Hugging Face loads it (the bridge's copy is set to add BOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets_dir() / "toy-facts"))


def fed_rows(model, run) -> list[list[int]]:
    """Every token row the editing method runs through the model (padding stripped)."""
    rows: list[list[int]] = []
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    original = model.run_with_hooks

    def spy(ids, *args, **kwargs):
        if ids.dtype == torch.long:
            for row in ids.tolist():
                while len(row) > 1 and row[-1] == pad:
                    row = row[:-1]
                rows.append(row)
        return original(ids, *args, **kwargs)

    model.run_with_hooks = spy
    try:
        edit = run()
    finally:
        del model.run_with_hooks
    return rows, edit


@pytest.mark.parametrize("method", ["rome", "memit", "ft", "kn"])
def test_without_bos_the_edit_sees_the_plain_tokenizer_ids(tiny_model, plain_tokenizer, method):
    model = tiny_model
    plain = plain_tokenizer(FACT.prompt)["input_ids"]
    bos = model.tokenizer.bos_token_id
    assert plain[0] != bos  # like GPT-2's tokenizer, it adds no BOS of its own
    runs = {"rome": lambda **kw: rome(model, FACT, layer=1, hparams=HP, **kw),
            "memit": lambda **kw: memit(model, [FACT], layers=[1], hparams=HP, stats=torch.eye(256), progress=False,
                                      **kw),
            "ft": lambda **kw: ft(model, FACT, layer=1, steps=2, **kw),
            "kn": lambda **kw: kn(model, FACT, steps=2, **kw)}
    rows, edit = fed_rows(model, lambda: runs[method](prepend_bos=False))
    assert edit.hparams["prepend_bos"] is False
    assert plain in [r[: len(plain)] for r in rows]  # the prompt, exactly as the tokenizer gives it
    assert all(r[0] != bos for r in rows)
    rows, edit = fed_rows(model, lambda: runs[method](prepend_bos=True))
    assert edit.hparams["prepend_bos"] is True
    assert [bos] + plain in [r[: len(plain) + 1] for r in rows]
    assert all(r[0] == bos for r in rows)
    assert default_prepend_bos(model) is True  # the model's own default is left as it was


def test_presets_follow_the_originals(tiny_model, monkeypatch):
    assert [p.prepend_bos for p in (ROME_GPT2_XL, ROME_GPT_J, MEMIT_GPT2_XL, MEMIT_GPT_J)] == [False] * 4
    assert ROME_TOY.prepend_bos is None and MEMIT_TOY.prepend_bos is None  # the bundled model: its own (BOS)
    assert editing_prepend_bos(tiny_model) is True  # an unknown model: TransformerLens's default
    monkeypatch.setattr(tiny_model, "workbench_spec", "gpt2-xl", raising=False)
    assert editing_prepend_bos(tiny_model) is True  # a name is not an identity
    monkeypatch.setattr(identity, "_REGISTERED", [])  # identity by config: make the tiny config GPT-2 XL's
    identity.register_known_model("gpt2-xl", hf_model(tiny_model).config.to_dict())
    assert editing_prepend_bos(tiny_model) is False
    assert editing_prepend_bos(tiny_model, True) is True
    edit = rome(tiny_model, FACT, layer=1, hparams={**HP, "v_loss_layer": None})
    assert edit.hparams["prepend_bos"] is False


def test_bos_convention_restores_the_model(tiny_model):
    with bos_convention(tiny_model, False) as bos:
        assert bos is False and default_prepend_bos(tiny_model) is False
    assert default_prepend_bos(tiny_model) is True
    with pytest.raises(RuntimeError), bos_convention(tiny_model, False):
        raise RuntimeError
    assert default_prepend_bos(tiny_model) is True


def test_memit_context_templates_are_memits(tiny_model, plain_tokenizer):
    hp = memit_hparams_for(tiny_model)
    assert hp.context_template_scheme == "memit" and hp.context_template_length_params == [[10, 5]]
    groups = context_templates(tiny_model, hp.context_template_length_params, scheme="memit",
                               prepend_bos=False)
    assert groups[0] == ["{}"] and len(groups) == 2 and len(groups[1]) == 5
    for word, template in zip(MEMIT_SEED_WORDS, groups[1]):
        assert template.startswith(word) and template.endswith(". {}")
        n_tokens = len(plain_tokenizer(template[: -len(". {}")])["input_ids"])
        assert 6 <= n_tokens <= 16  # 10 tokens sampled; decoding and re-encoding random tokens may merge or split some
    with_bos = context_templates(tiny_model, [[10, 5]], scheme="memit", prepend_bos=True)
    assert [t.split(" ")[0][: len(w)] for t, w in zip(with_bos[1], MEMIT_SEED_WORDS)] == list(MEMIT_SEED_WORDS)
    rome_groups = context_templates(tiny_model, [[5, 2]])
    assert [len(g) for g in rome_groups] == [1, 2]


def test_trace_records_the_convention(tiny_model):
    from workbench.tracing import severed_trace, trace

    res = trace(tiny_model, "Miles Davis plays the", subject="Miles Davis", samples=2, kinds=("hidden",),
                prepend_bos=False)
    assert res.prepend_bos is False and res.tokens[0] != "<|endoftext|>" and res.engine
    assert trace(tiny_model, "Miles Davis plays the", subject="Miles Davis", samples=2,
                 kinds=("hidden",)).prepend_bos is True
    sev = severed_trace(tiny_model, "Miles Davis plays the", subject="Miles Davis", samples=2, prepend_bos=False)
    assert sev.prepend_bos is False and type(sev).from_dict(sev.to_dict()).prepend_bos is False


def test_evaluate_uses_one_convention_and_records_it(tiny_model):
    from workbench.editing import Edit
    from workbench.evaluation import evaluate

    seen = []

    def nudge(model, fact, locus="subject"):
        seen.append(default_prepend_bos(model))
        name = "transformer.h.1.mlp.c_proj.weight"
        return Edit(deltas={name: torch.zeros(256, 64)}, method="nudge", locus=locus)

    table = evaluate(tiny_model, [FACT], methods=(nudge,), requests=("entity",), baseline=False, progress=False,
                     prepend_bos=False)
    assert seen == [False] and table.attrs["prepend_bos"] is False
    assert table.attrs["details"]["prepend_bos"].tolist() == [False]
    assert default_prepend_bos(tiny_model) is True


def test_cli_no_prepend_bos(tiny_model, tmp_path, capsys):
    from workbench.cli import main
    from workbench.loading import save_hf
    from workbench.tracing.results import TraceResult

    folder = save_hf(tiny_model, tmp_path / "model")
    out = tmp_path / "t.json"
    assert main(["trace", "--model", str(folder), "--device", "cpu", "--prompt", "Miles Davis plays the",
                 "--subject", "Miles Davis", "--samples", "2", "--kinds", "hidden", "--no-prepend-bos",
                 "--json", str(out)]) == 0
    res = TraceResult.load_json(out)
    assert res.prepend_bos is False and res.engine == "incremental"
    assert main(["edit", "--model", str(folder), "--device", "cpu", "--prompt", "{} plays the", "--subject",
                 "Miles Davis", "-o", "guitar", "--layer", "1", "--no-prepend-bos", "--corpus", str(_corpus(tmp_path)),
                 "--n-tokens", "300", "--cache-dir", str(tmp_path / "stats")]) == 0
    assert "without BOS" in capsys.readouterr().out


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"Miles Davis plays the trumpet in Paris {i}." for i in range(40)))
    return path
