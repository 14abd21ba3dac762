"""The Inspector's callbacks, driven headless through its widget objects."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.widgets import Inspector


def need(module: str, name: str):
    """Skip unless ``module`` exists and defines ``name`` (modules land in parallel)."""
    mod = pytest.importorskip(module)
    if not hasattr(mod, name):
        pytest.skip(f"{module}.{name} not available yet")
    return mod


PROMPT = "The mother tongue of Varo Keltin is"
SUBJECT = "Varo Keltin"


@pytest.fixture()
def inspector(tiny_model):
    return Inspector(tiny_model, prompt=PROMPT, subject=SUBJECT, samples=2)


def test_layout_and_token_marks(inspector, tiny_model):
    from workbench.spans import relation_span, subject_span, tokenize

    toks = tokenize(tiny_model, PROMPT)
    assert [inspector.widget.get_title(i) for i in range(2)] == ["Trace", "Edit"]
    assert len(inspector.token_buttons) == len(toks)
    assert inspector.selected_positions() == list(subject_span(toks, SUBJECT).positions)
    inspector.corrupt.value = "relation"
    assert inspector.selected_positions() == list(relation_span(toks, SUBJECT).positions)
    assert inspector.corrupt.value == "relation"  # syncing marks does not switch to "tokens"


def test_clicking_a_token_switches_to_tokens(inspector):
    inspector.token_buttons[2].value = not inspector.token_buttons[2].value
    assert inspector.corrupt.value == "tokens"
    for b in inspector.token_buttons:
        b.value = False
    inspector.token_buttons[1].value = True
    inspector.token_buttons[3].value = True
    kw = inspector.trace_kwargs()
    assert kw["corrupt"] == [1, 3]
    assert kw["samples"] == 2 and kw["noise"] == "s3" and kw["kinds"] == ("hidden", "mlp", "attn")
    assert kw["window"] == 10  # ROME's default, not clamped to the (3-layer) model's depth
    inspector.noise.value = "0.25"
    assert inspector.trace_kwargs()["noise"] == 0.25


def test_new_prompt_rebuilds_tokens(inspector, tiny_model):
    from workbench.spans import tokenize

    inspector.prompt.value = "Miles Davis plays the"
    inspector.subject.value = "Miles Davis"
    assert len(inspector.token_buttons) == len(tokenize(tiny_model, "Miles Davis plays the"))
    assert inspector.selected_positions() == [1, 2] or inspector.selected_positions()[0] == 1


def test_errors_are_shown_not_raised(inspector):
    for box in inspector.kind_boxes.values():
        box.value = False
    assert inspector.run_trace() is None
    assert "kind" in inspector.error and "color:#b00" in inspector.status.value
    inspector.undo_button.click()  # nothing to undo: no error
    assert inspector.edit_status.value == "nothing to undo"


def test_fact_picker_fills_fields(tiny_model):
    from workbench.facts import Fact

    facts = [Fact("Varo Keltin", "The mother tongue of {} is", "Tuvan", target_new="Greek",
                  paraphrases=("Varo Keltin speaks",)),
             Fact("Miles Davis", "{} plays the", "trumpet", target_new="piano")]
    ins = Inspector(tiny_model, facts)
    assert ins.prompt.value == facts[0].prompt and ins.new_object.value == "Greek"
    ins.fact_picker.value = 1
    assert ins.prompt.value == "Miles Davis plays the" and ins.subject.value == "Miles Davis"
    assert ins.new_object.value == "piano"
    assert ins.current_fact() is facts[1]


# --------------------------------------------------------------------------- with tracing / editing


def test_run_button_traces_and_draws(inspector, tiny_model):
    need("workbench.tracing", "trace")
    inspector.run_button.click()
    assert inspector.error is None, inspector.error
    r = inspector.result
    assert set(r.scores) == {"hidden", "mlp", "attn"}
    assert r.scores["mlp"].shape == (len(inspector.token_buttons), tiny_model.cfg.n_layers)
    assert inspector.progress.value == inspector.progress.max == 3
    assert [t.name for t in inspector.figure.data] == ["hidden", "mlp", "attn"]
    assert "answer" in inspector.status.value
    inspector.value.value = "ie"  # redraw without re-running
    np.testing.assert_allclose(np.asarray(inspector.figure.data[0].z, dtype=float), r.ie("hidden"), atol=1e-6)


def test_run_with_clicked_tokens(inspector):
    need("workbench.tracing", "trace")
    inspector.token_buttons[1].value = True  # switches to "tokens", marks stay as they were plus this one
    for i, b in enumerate(inspector.token_buttons):
        b.value = i in (1, 2)
    inspector.kind_boxes["mlp"].value = False
    inspector.kind_boxes["attn"].value = False
    result = inspector.run_trace()
    assert inspector.error is None, inspector.error
    assert list(result.corrupted_span.positions) == [1, 2]
    assert list(result.scores) == ["hidden"]


def test_edit_apply_and_undo(inspector, tiny_model):
    need("workbench.tracing", "trace")
    need("workbench.editing", "rome")
    from workbench.loading import model_fingerprint

    from workbench.editing.hparams import ROMEHyperParams

    corpus = ["The mother tongue of Varo Keltin is Tuvan. Miles Davis plays the trumpet."] * 40
    inspector.rome_kwargs = {"hparams": ROMEHyperParams(layers=[1], mom2_dataset=corpus, mom2_n_tokens=1000,
                                                        context_templates=["{}"], v_num_grad_steps=4)}
    before = model_fingerprint(tiny_model)
    inspector.new_object.value = "Greek"
    inspector.paraphrases.value = "Varo Keltin speaks\nVaro Keltin grew up speaking"
    edit = inspector.apply_edit()
    assert inspector.error is None, inspector.error
    assert edit is not None and edit.is_applied(tiny_model)
    assert model_fingerprint(tiny_model) != before
    table = inspector.edit_table
    assert list(table.columns.get_level_values(0).unique()) == ["before", "after"]
    assert len(table) == 3 and "P(Greek)" in table["after"].columns
    assert inspector.edited_figure is not None and not inspector.undo_button.disabled
    inspector.undo_button.click()
    assert inspector.error is None, inspector.error
    assert not edit.is_applied(tiny_model)
    assert model_fingerprint(tiny_model) == before
    assert inspector.undo_button.disabled
