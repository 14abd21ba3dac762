"""The Inspector's callbacks, driven headless through its widget objects."""

from __future__ import annotations

import re

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


@pytest.fixture(autouse=True)
def unedited(tiny_model):
    """Every test starts and ends with no edit applied to the shared model (an Inspector reads the
    applied edits from the model, so one test's edit would show in the next test's badge)."""
    from workbench.editing import applied_edits

    assert not applied_edits(tiny_model), "an earlier test left an edit applied"
    yield
    for edit in reversed(applied_edits(tiny_model)):
        edit.revert(tiny_model)


@pytest.fixture()
def inspector(tiny_model):
    return Inspector(tiny_model, prompt=PROMPT, subject=SUBJECT, samples=2)


def test_layout_and_token_marks(inspector, tiny_model):
    from workbench.spans import relation_span, subject_span, tokenize

    toks = tokenize(tiny_model, PROMPT)
    assert [inspector.tabs.get_title(i) for i in range(2)] == ["Trace", "Edit"]
    assert len(inspector.token_buttons) == len(toks)
    assert inspector.selected_positions() == list(subject_span(toks, SUBJECT).positions)
    inspector.corrupt.value = "relation"
    assert inspector.selected_positions() == list(relation_span(toks, SUBJECT).positions)
    assert inspector.corrupt.value == "relation"  # syncing marks does not switch to "tokens"


def test_clicking_a_token_switches_to_tokens(inspector):
    inspector.click_token(2)
    assert inspector.corrupt.value == "tokens"
    assert inspector.selected_positions() == [2]  # only the clicked token: the subject's marks go
    assert inspector.token_buttons[2].button_style == "warning" and inspector.token_buttons[5].button_style == ""
    inspector.click_token(2)
    inspector.click_token(1)
    inspector.click_token(3)
    kw = inspector.trace_kwargs()
    assert kw["corrupt"] == [1, 3]
    assert kw["samples"] == 2 and kw["noise"] == "s3" and kw["kinds"] == ("hidden", "mlp", "attn")
    assert kw["window"] == 2  # min(10, ceil(3 / 2)) on the 3-layer model
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
    inspector.click_token(1)  # switches to "tokens" with only this token marked
    assert inspector.selected_positions() == [1]
    inspector.click_token(2)
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
    assert list(table.columns.get_level_values(0).unique()) == ["", "before", "after"]  # probe, before, after
    assert len(table) == 3 and "P(Greek)" in table["after"].columns
    assert inspector.edited_figure is not None and not inspector.undo_button.disabled
    inspector.undo_button.click()
    assert inspector.error is None, inspector.error
    assert not edit.is_applied(tiny_model)
    assert model_fingerprint(tiny_model) == before
    assert inspector.undo_button.disabled


# --------------------------------------------------------------------------- one state model (issue problems 1, 2, 4, 8)

CORPUS = ["The mother tongue of Varo Keltin is Tuvan. Miles Davis plays the trumpet."] * 40


def _rome_hparams(steps: int = 4, **kw):
    from workbench.editing.hparams import ROMEHyperParams

    return ROMEHyperParams(layers=[1], mom2_dataset=CORPUS, mom2_n_tokens=1000, context_templates=["{}"],
                           v_num_grad_steps=steps, **kw)


def _facts():
    from workbench.facts import Fact

    return [Fact("Varo Keltin", "The mother tongue of {} is", "Tuvan", target_new="Greek",
                 paraphrases=("Varo Keltin speaks",)),
            Fact("Miles Davis", "{} plays the", "trumpet", target_new="piano", paraphrases=("Miles Davis is a",)),
            Fact("Toko Yasuda", "The mother tongue of {} is", "Tuvan", target_new="Greek")]


def _texts(out) -> str:
    return " ".join(str(o.get("data", {})) for o in out.outputs)


def test_undo_clears_edit_outputs_and_badge(inspector, tiny_model):
    """Problem 1: after Apply then Undo the table and maps are gone (not left behind)."""
    need("workbench.editing", "rome")
    inspector.rome_kwargs = {"hparams": _rome_hparams()}
    inspector.new_object.value = "Greek"
    assert inspector.apply_edit() is not None, inspector.error
    assert len(inspector.edit_out.outputs) == 2  # the table and the before/after maps
    assert "edited model" in inspector.badge.value
    assert inspector.undo_edit() is not None
    assert inspector.edit_out.outputs == () and inspector.edit_table is None and inspector.edited_figure is None
    assert inspector.badge.value == ""
    assert inspector.edit_progress.value == 0 and inspector.edit_progress_label.value == ""


def test_edit_follows_the_typed_prompt(tiny_model):
    """Problem 2: typing another fact in the Trace tab makes the Edit tab edit that fact."""
    need("workbench.editing", "rome")
    ins = Inspector(tiny_model, _facts(), samples=2, rome_kwargs={"hparams": _rome_hparams()})
    assert ins.paraphrases.value == "Varo Keltin speaks" and ins.new_object.value == "Greek"
    ins.prompt.value = "Joren Marpen works for"
    ins.subject.value = "Joren Marpen"
    # the example's paraphrases and new object belong to the example: cleared
    assert ins.fact_picker.value == -1 and ins.paraphrases.value == "" and ins.new_object.value == ""
    assert "Joren Marpen works for" in ins.edit_target.value
    ins.new_object.value = "Amazon"
    ins.retrace.value = False
    assert ins.apply_edit() is not None, ins.error
    rows = list(ins.edit_table.index)
    assert rows[0] == "Joren Marpen works for"
    assert "Varo Keltin speaks" not in rows  # the old example's paraphrase
    assert "P(Amazon)" in ins.edit_table["after"].columns
    probes = list(ins.edit_table[("", "probe")])
    assert probes[0] == "edit prompt" and probes.count("bleed: other subject, same phrasing") == 3
    assert "Miles Davis works for" in rows  # another subject in the typed phrasing, not another relation


def test_failed_edit_is_reported_with_p_new(inspector, tiny_model):
    """Problem 4: an edit that does not make the new object top-1 with P >= 0.5 says so."""
    need("workbench.editing", "rome")
    # one tiny optimisation step: the edit cannot reach the new object
    inspector.rome_kwargs = {"hparams": _rome_hparams(steps=1, v_lr=1e-6)}
    inspector.new_object.value = "Blorptastic Corp"
    inspector.retrace.value = False
    edit = inspector.apply_edit()
    assert edit is not None, inspector.error
    outcome = inspector.edit_outcome
    assert not outcome.success and outcome.p_new < 0.5
    assert "edit failed" in inspector.edit_status.value and f"{outcome.p_new:.3f}" in inspector.edit_status.value
    assert inspector.edit_progress.bar_style == "danger"
    assert "applied the" not in inspector.edit_status.value
    inspector.undo_edit()


def test_edit_outcome_rule():
    from workbench.widgets import EditOutcome

    assert EditOutcome("p", "x", 0.6, " x", 0.6, True).success
    assert not EditOutcome("p", "x", 0.45, " x", 0.45, True).success  # top-1 but below 0.5
    assert not EditOutcome("p", "x", 0.0, " Paris", 0.53, False).success


def test_trace_map_cleared_or_marked_when_inputs_change(inspector):
    """Problem 8: old maps do not stay under new inputs, errors, or a changed model."""
    inspector.run_trace()
    assert inspector.figure is not None and len(inspector.trace_out.outputs) == 1
    assert "Varo Keltin" in inspector.figure.layout.title.text  # the title names the prompt
    inspector.samples.value = 3
    assert "out of date" in inspector.trace_stale.value and inspector.figure is not None
    inspector.samples.value = 2
    assert inspector.trace_stale.value == ""
    inspector.prompt.value = "Miles Davis plays the"
    assert inspector.figure is None and inspector.trace_out.outputs == ()
    inspector.subject.value = "Miles Davis"
    inspector.run_trace()
    assert len(inspector.trace_out.outputs) == 1
    shown = inspector.figure
    for box in inspector.kind_boxes.values():
        box.value = False
    inspector.run_trace()  # an error: the map of the earlier settings stays, marked out of date
    assert inspector.error and inspector.figure is shown and len(inspector.trace_out.outputs) == 1
    assert "kinds" in inspector.trace_stale.value and "color:#b00" in inspector.status.value


def test_new_example_clears_the_map(tiny_model):
    ins = Inspector(tiny_model, _facts(), samples=2)
    ins.run_trace()
    assert ins.figure is not None
    ins.fact_picker.value = 1
    assert ins.prompt.value == "Miles Davis plays the" and ins.figure is None and ins.trace_out.outputs == ()
    assert ins.paraphrases.value == "Miles Davis is a" and ins.new_object.value == "piano"


def test_subject_warning_before_run(inspector):
    inspector.subject.value = "Nobody Here"
    assert "does not occur" in inspector.status.value
    inspector.subject.value = SUBJECT
    assert inspector.status.value == ""


def test_trace_after_edit_is_marked_and_stale_after_undo(inspector):
    need("workbench.editing", "rome")
    inspector.rome_kwargs = {"hparams": _rome_hparams()}
    inspector.new_object.value = "Greek"
    inspector.retrace.value = False
    inspector.apply_edit()
    inspector.run_trace()
    assert "[edited model]" in inspector.figure.layout.title.text
    assert "edited model" in inspector.status.value
    inspector.undo_edit()
    assert "edit was applied or undone" in inspector.trace_stale.value


def test_progress_is_monotone_with_elapsed_time(inspector):
    need("workbench.editing", "rome")
    seen: list[tuple[int, int]] = []
    inspector.edit_progress.observe(lambda ch: seen.append((inspector.edit_progress.value, inspector.edit_progress.max)),
                                    names="value")
    inspector.rome_kwargs = {"hparams": _rome_hparams()}
    inspector.new_object.value = "Greek"
    inspector.apply_edit()
    values = [v for v, _ in seen]
    assert values == sorted(values) and values[-1] == seen[-1][1]
    assert len({m for _, m in seen}) == 1  # the number of steps is fixed when the run starts
    assert re.search(r"(edited|edit failed) in \d+\.\d s", inspector.edit_progress_label.value)
    inspector.undo_edit()


def test_cancel_stops_a_run(inspector):
    # cancel as soon as the first kind is traced
    inspector.progress.observe(lambda ch: inspector.cancel() if ch["new"] == 1 else None, names="value")
    assert inspector.run_trace() is None
    assert "cancelled" in inspector.status.value and inspector.figure is None
    assert not inspector.run_button.disabled and inspector.cancel_button.disabled


def test_cancelled_edit_is_reverted(inspector, tiny_model):
    need("workbench.editing", "rome")
    from workbench.loading import model_fingerprint

    before = model_fingerprint(tiny_model)
    inspector.rome_kwargs = {"hparams": _rome_hparams()}
    inspector.new_object.value = "Greek"
    inspector.edit_progress.observe(lambda ch: inspector.cancel() if ch["new"] == 3 else None, names="value")
    assert inspector.apply_edit() is None
    assert model_fingerprint(tiny_model) == before and not inspector.edits and inspector.badge.value == ""
    assert "cancelled" in inspector.edit_status.value


def test_background_click_runs_in_a_thread(tiny_model):
    ins = Inspector(tiny_model, prompt=PROMPT, subject=SUBJECT, samples=2, background=True)
    ins.run_button.click()
    ins.wait(120)
    assert ins.error is None and ins.figure is not None


def test_layer_dropdown_shows_method_default(inspector):
    assert inspector.layer.label == "method default"
    assert inspector.layer.value is not None
    assert "rome" in [v for _, v in inspector.method.options]


def test_method_list_is_data_driven(tiny_model, monkeypatch):
    import workbench.evaluation as ev

    monkeypatch.setitem(ev.METHODS, "mend", "workbench.editing.rome:rome")
    ins = Inspector(tiny_model, prompt=PROMPT, subject=SUBJECT)
    assert "mend" in [v for _, v in ins.method.options]


def test_default_window_in_the_inspector(tiny_model):
    from workbench.tracing import default_window

    ins = Inspector(tiny_model, prompt=PROMPT, subject=SUBJECT)
    assert ins.window.value == default_window(tiny_model.cfg.n_layers) == 2


def test_outputs_are_set_not_captured(inspector):
    """Problem 9: outputs are written into the Output widgets' state, never captured with ``with out:``.

    Capturing routes the kernel's output messages through the Output widget's ``msg_id``; a
    headless client (nbclient, nbconvert, nbmake) then sends the captured outputs back to the
    kernel as ``comm_msg`` on the shell channel while it waits on that channel for the cell's
    ``execute_reply``, which under load lost the reply and hung the run.
    """
    need("workbench.editing", "rome")
    captured: list = []
    for out in (inspector.trace_out, inspector.edit_out):
        out.observe(lambda ch: captured.append(ch["new"]), names="msg_id")
    inspector.run_trace()
    inspector.rome_kwargs = {"hparams": _rome_hparams()}
    inspector.new_object.value = "Greek"
    inspector.apply_edit()
    assert len(inspector.trace_out.outputs) == 1 and len(inspector.edit_out.outputs) == 2
    inspector.value.value = "ie"
    inspector.undo_edit()
    assert captured == []


# --------------------------------------------------------------------------- issue 22: one state (problems 1, 6, 7)


def _edit(ins, new="Greek"):
    ins.rome_kwargs = {"hparams": _rome_hparams()}
    ins.new_object.value = new
    ins.retrace.value = False
    edit = ins.apply_edit()
    assert edit is not None, ins.error
    return edit


def test_recreated_inspector_shows_the_badge_and_undoes(tiny_model):
    """Problem 1: re-running the Inspector cell on an edited model: the badge shows and Undo works."""
    from workbench.loading import model_fingerprint

    before = model_fingerprint(tiny_model)
    first = Inspector(tiny_model, prompt=PROMPT, subject=SUBJECT, samples=2)
    edit = _edit(first)
    again = Inspector(tiny_model, prompt=PROMPT, subject=SUBJECT, samples=2)
    assert "edited model: 1 edit(s) applied" in again.badge.value and "Greek" in again.badge.value
    assert again.edits == [edit] and not again.undo_button.disabled
    again.run_trace()
    assert "[edited model]" in again.figure.layout.title.text
    assert again.undo_edit() is edit and not edit.is_applied(tiny_model)
    assert model_fingerprint(tiny_model) == before and again.badge.value == ""
    assert "edit was applied or undone" in again.trace_stale.value
    first.render()  # the first widget reads the same model: its badge goes too
    assert first.badge.value == "" and first.undo_button.disabled


def test_old_error_goes_when_a_valid_run_starts(inspector):
    """Problem 6: an old error stayed under the Edit tab's buttons during the next (valid) run."""
    inspector.rome_kwargs = {"hparams": _rome_hparams()}
    inspector.new_object.value = ""
    assert inspector.apply_edit() is None and "new object" in inspector.edit_status.value
    during: list[str] = []
    inspector.edit_progress.observe(lambda ch: during.append(inspector.edit_status.value), names="value")
    inspector.new_object.value = "Greek"
    inspector.retrace.value = False
    assert inspector.apply_edit() is not None
    assert during and not any("new object" in s for s in during)


def test_badge_says_editing_while_the_edit_runs(inspector):
    """Problem 6: the badge said "1 edit(s) applied" while the edit was still running."""
    seen: list[str] = []
    inspector.edit_progress.observe(lambda ch: seen.append(inspector.badge.value), names="value")
    _edit(inspector)
    assert seen and all("editing the model" in b and "edit(s) applied" not in b for b in seen[:-1])
    assert "1 edit(s) applied" in inspector.badge.value


def test_progress_label_after_an_error(inspector):
    """Problem 6: after an error the progress label stayed at "1/3 tracing hidden… 0.0 s"."""
    inspector.noise.value = "loud"  # not a noise rule: the first kind's trace raises
    assert inspector.run_trace() is None and inspector.error
    assert "1/3" not in inspector.progress_label.value and "stopped by an error" in inspector.progress_label.value
    assert inspector.progress.bar_style == "danger"


def test_too_long_prompt_empties_the_token_bar(inspector, tiny_model):
    """Problem 6: after a too-long prompt the token bar showed the previous prompt's tokens."""
    assert inspector.token_buttons
    inspector.prompt.value = " ".join(["word"] * (tiny_model.cfg.n_ctx + 5)) + " " + SUBJECT
    assert inspector.token_buttons == [] and inspector.token_bar.children == ()
    assert "n_ctx" in inspector.status.value
    assert inspector.run_trace() is None and "n_ctx" in inspector.error


def test_cancelled_rerun_keeps_the_previous_map(inspector):
    """Problem 6: cancelling a re-run discarded the previous valid map."""
    inspector.run_trace()
    shown = inspector.figure
    inspector.samples.value = 3
    inspector.progress.observe(lambda ch: inspector.cancel() if ch["new"] == 1 else None, names="value")
    assert inspector.run_trace() is None
    assert inspector.figure is shown and len(inspector.trace_out.outputs) == 1
    assert "previous" in inspector.status.value and "samples" in inspector.trace_stale.value
    assert "The map shown was computed for the earlier inputs" in inspector.trace_stale.value


def test_out_of_date_note_names_what_changed(tiny_model):
    """Problem 6: the "out of date" wording was garbled after switching the example."""
    ins = Inspector(tiny_model, _facts(), samples=2)
    _edit(ins)
    ins.fact_picker.value = 1
    note = ins.edit_stale.value
    assert note.count("out of date") == 1 and "prompt or subject" in note and "new object" in note
    assert "since this was computed" not in note
    assert "The table and maps shown were computed for the earlier inputs; run again" in note


def test_one_value_toggle(inspector):
    """Problem 6: the figure's own p/IE buttons could disagree with the Inspector's toggle."""
    inspector.run_trace()
    assert not inspector.figure.layout.updatemenus
    inspector.value.value = "ie"
    assert inspector.figure.data[0].colorbar.title.text == "IE"


def test_empty_prompt_is_named(inspector):
    """Problem 6: an empty prompt was reported as "subject must occur exactly once in the prompt ''"."""
    inspector.prompt.value = ""
    assert "type a prompt" in inspector.status.value
    assert inspector.run_trace() is None and inspector.error == "ValueError: type a prompt"


def test_locality_as_in_the_evaluation(tiny_model):
    """Problem 7: after an edit, other subjects of the relation in both phrasings (bleed) and the
    subject's other relations (locality), from the perspective helpers."""
    from workbench.facts import load_facts
    from workbench.perspective import phrasings

    facts = load_facts("toy-facts")
    fact = facts[0]
    ins = Inspector(tiny_model, facts, samples=2)
    ph = phrasings(fact)
    others = {f.subject for f in facts if f.relation_id == fact.relation_id and f.subject != fact.subject}
    prompts = ins.neighbour_prompts(fact)
    assert any(p == ph.relation_template.format(s) for p in prompts for s in others)  # the leak's prompts
    rows = ins.state.probe_rows(fact)
    probes = [probe for _, probe in rows]
    assert probes.count("bleed: other subject, subject-first") == 3
    assert probes.count("bleed: other subject, relation-first") == 3
    rel_template = ph.relation_template
    bleed_rel = [p for p, probe in rows if probe == "bleed: other subject, relation-first"]
    assert all(fact.subject not in p for p in bleed_rel)
    assert any(p == rel_template.format(other.subject) for p in bleed_rel for other in facts
               if other.relation_id == fact.relation_id)
    other_relations = [p for p, probe in rows if probe.startswith("locality")]
    assert other_relations and all(fact.subject in p for p in other_relations)
    assert {f.relation_id for f in facts if f.prompt in other_relations} <= {f.relation_id for f in facts} - {
        fact.relation_id}
    # a typed prompt in one of the relation's phrasings is that relation
    ins.prompt.value, ins.subject.value = rel_template.format("Varo Keltin"), "Varo Keltin"
    typed = ins.current_fact()
    assert typed.relation_id == fact.relation_id
    assert "bleed: other subject, relation-first" in [probe for _, probe in ins.state.probe_rows(typed)]


def test_probe_facts_widen_the_rows_beyond_the_examples(tiny_model):
    """Few examples in the dropdown, the whole dataset for bleed and locality rows."""
    from workbench.facts import load_facts

    facts = load_facts("toy-facts")
    few = Inspector(tiny_model, facts[:3], samples=2)
    full = Inspector(tiny_model, facts[:3], samples=2, probe_facts=facts)
    assert len(full.fact_picker.options) == len(few.fact_picker.options) == 4
    labels = [probe for _, probe in full.state.probe_rows(facts[0])]
    assert labels.count("bleed: other subject, relation-first") == 3
    assert any(label.startswith("locality") for label in labels)
    assert len(few.state.probe_rows(facts[0])) < len(labels)
