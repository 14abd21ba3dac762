"""MEND: the editor network, its edits (rank, reversibility, families), training, resume, the shipped editor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.editing.mend import (MEND_TOY, MendEditor, MendHyperParams, MendModelMismatch, collect_factors,
                                    default_inner_params, edit_rows, logits_of, mend, shipped_editor_path)
from workbench.editing.hparams import HyperParameterError
from workbench.editing.mend_train import toy_training_facts, train_mend
from workbench.integrity import IntegrityError, load_torch
from workbench.evaluation import evaluate, select_facts

from .conftest import identical, snapshot

REPO = Path(__file__).resolve().parents[2]

# editors trained for two steps on random models do not reach their objects; that is not under test here
pytestmark = pytest.mark.filterwarnings("ignore::workbench.editing.edit.EditNotReachedWarning")

TINY = dict(rank=16, batch_size=4, n_val=8, val_every=2, checkpoint_every=1, early_stop_patience=100,
            edit_lr=1e-3, lr=1e-3, lr_lr=1e-3, n_blocks=2)


@pytest.fixture(scope="module")
def train_facts():
    return toy_training_facts(n_subjects=12, seed=3)


def quick_editor(model, facts, out, steps: int = 2, **changes) -> MendEditor:
    """A small editor trained for ``steps`` steps (enough for normalisation statistics)."""
    hp = MendHyperParams(**{**TINY, **changes})
    return train_mend(model, facts, hparams=hp, out=out, max_steps=steps, progress=False).editor


@pytest.fixture(scope="module")
def tiny_editor(tiny_model, train_facts, tmp_path_factory):
    return quick_editor(tiny_model, train_facts, tmp_path_factory.mktemp("mend-tiny"))


def test_hparams_validate_and_presets():
    with pytest.raises(ValueError, match="init"):
        MendHyperParams(init="zeros")
    with pytest.raises(HyperParameterError, match="unknown MendHyperParams field"):
        MendHyperParams.from_dict({"edit_lr": 1e-4, "bogus": 1})
    with pytest.raises(HyperParameterError, match="factor_positions"):
        MendHyperParams(factor_positions="subject")
    assert MendHyperParams().factor_positions == "all"  # the originals' choice is the default
    assert wb.editing.MEND_GPT2_XL.inner_params[:2] == ("transformer.h.45.mlp.c_proj.weight",
                                                       "transformer.h.45.mlp.c_fc.weight")
    assert len(wb.editing.MEND_GPT_J.inner_params) == 6
    assert all(".h.2" in n for n in wb.editing.MEND_GPT_J.inner_params)
    assert (wb.editing.MEND_GPT2_XL.edit_lr, wb.editing.MEND_GPT2_XL.lr, wb.editing.MEND_GPT2_XL.lr_lr,
            wb.editing.MEND_GPT2_XL.cedit, wb.editing.MEND_GPT2_XL.cloc) == (1e-4, 1e-6, 1e-4, 0.1, 1.0)


def test_identity_init_and_shared_networks(tiny_model):
    hp = MendHyperParams(**{**TINY, "n_blocks": 3})
    ed = MendEditor.for_model(tiny_model, hp)
    # one network per weight shape (c_fc 64x256 and c_proj 256x64), three modes each
    assert sorted(ed.nets) == ["256x64", "64x256"]
    assert sorted(ed.mode.values()) == [0, 0, 1, 1, 2, 2]
    net = ed.nets["64x256"]
    net.update_stats(torch.randn(50, 64), torch.randn(50, 256))
    ed.eval()
    x, d = torch.randn(5, 64), torch.randn(5, 256)
    tx, td = net(x, d, mode=1)
    mean_x, std_x = net.mean_x.float(), (net.m2_x / (net.count - 1)).sqrt().float()
    assert torch.allclose(tx, (x - mean_x) / (std_x + 1e-7), atol=1e-5)  # U = 0: the identity on normalised input


def test_running_stats_match_batch_stats(tiny_model):
    ed = MendEditor.for_model(tiny_model, MendHyperParams(**TINY))
    net = next(iter(ed.nets.values()))
    rows_x, rows_d = torch.randn(30, net.d_in), torch.randn(30, net.d_out)
    for chunk in range(0, 30, 7):
        net.update_stats(rows_x[chunk:chunk + 7], rows_d[chunk:chunk + 7])
    assert torch.allclose(net.mean_x.float(), rows_x.mean(0), atol=1e-5)
    assert torch.allclose((net.m2_d / (net.count - 1)).sqrt().float(), rows_d.std(0), atol=1e-5)


def test_factors_cover_every_position_by_default(tiny_model, tiny_editor):
    """As the originals: the factors of every position with nonzero input and gradient, so that
    Σ_t δ_t x_tᵀ is the weight's whole fine-tuning gradient; "target" keeps the target positions only."""
    from workbench.editing.edit import _hf

    modules = tiny_editor.check_model(tiny_model)
    rows = edit_rows(tiny_model, [("The birthplace of Varo Keltin is", " Paris London")])
    factors, _ = collect_factors(tiny_model, tiny_editor.weights, modules, rows)
    target, _ = collect_factors(tiny_model, tiny_editor.weights, modules, rows, positions="target")
    params = [m.weight for m in modules]
    for p in params:
        p.requires_grad_(True)
    try:
        logits = _hf(tiny_model)(input_ids=rows.ids).logits
        logp = torch.log_softmax(logits[rows.tgt_row, rows.tgt_pos], -1)
        grads = torch.autograd.grad(-logp.gather(1, rows.tgt_id[:, None]).mean(), params)
    finally:
        for p in params:
            p.requires_grad_(False)
    n_tokens = int(rows.lengths[0])
    for w, grad in zip(tiny_editor.weights, grads):
        x, d = factors.x[w.name], factors.d[w.name]
        full = x.T @ d if w.orientation == "in_out" else d.T @ x
        torch.testing.assert_close(full, grad, rtol=1e-4, atol=1e-6)
        assert factors.row[w.name].tolist() == [0] * len(x)
        assert target.x[w.name].shape[0] == rows.tgt_id.numel()
        if ".h.1." in w.name:  # before the last block: every position reaches the loss through attention
            assert x.shape[0] == n_tokens > rows.tgt_id.numel()
            partial = target.x[w.name].T @ target.d[w.name]
            assert not torch.allclose(partial, grad, rtol=1e-3, atol=1e-6)
        else:  # the last block's MLP only reaches the loss at the target positions
            assert x.shape[0] == rows.tgt_id.numel()


@pytest.mark.parametrize("obj", [" Paris", " Paris London Berlin"])
def test_rank_at_most_factor_positions(tiny_model, tiny_editor, obj):
    fact = wb.Fact(subject="Varo Keltin", template="The birthplace of {} is", target_true="Rome")
    edit = mend(tiny_model, fact, obj, editor=tiny_editor)
    n_tokens = len(wb.predict.object_token_ids(tiny_model, obj))
    assert edit.info["n_target_tokens"] == n_tokens and edit.info["factor_positions"] == "all"
    assert edit.info["n_factor_positions"] > n_tokens
    assert set(edit.param_names) == set(tiny_editor.names)
    for name, delta in edit.deltas.items():
        rank = int(torch.linalg.matrix_rank(delta.float()))
        assert 1 <= rank <= edit.info["n_factor_positions"], (name, rank)
        if ".h.2." in name:  # the last block: gradient at the target positions only
            assert rank <= n_tokens


def test_target_only_factors_stay_a_named_option(tiny_model, train_facts, tmp_path):
    editor = quick_editor(tiny_model, train_facts, tmp_path, factor_positions="target")
    fact = wb.Fact(subject="Varo Keltin", template="The birthplace of {} is", target_true="Rome")
    edit = mend(tiny_model, fact, " Paris London", editor=editor)
    assert edit.info["factor_positions"] == "target" and edit.info["n_factor_positions"] == 2
    assert all(int(torch.linalg.matrix_rank(d.float())) <= 2 for d in edit.deltas.values())


def test_edit_is_undoable_and_savable(tiny_model, tiny_editor, tmp_path):
    fact = wb.Fact(subject="Mira Dosvi", template="{} plays the", target_true="piano", target_new="guitar")
    before = snapshot(tiny_model)
    edit = mend(tiny_model, fact, editor=tiny_editor)
    assert identical(tiny_model, before)  # computing an edit never touches the weights
    ids = torch.tensor([wb.tokenize(tiny_model, fact.prompt).ids])
    clean = logits_of(tiny_model, ids)
    with edit.applied(tiny_model):
        assert not identical(tiny_model, before)
    assert identical(tiny_model, before)
    assert torch.equal(logits_of(tiny_model, ids), clean)
    again = wb.Edit.load(edit.save(tmp_path / "mend.safetensors"))
    assert again.method == "mend" and all(torch.equal(again.deltas[n], d) for n, d in edit.deltas.items())


def test_bos_convention_is_the_editors_unless_given(tiny_model, tiny_editor):
    fact = wb.Fact(subject="Mira Dosvi", template="{} plays the", target_true="piano", target_new="guitar")
    default = mend(tiny_model, fact, editor=tiny_editor)
    assert default.hparams["prepend_bos"] is tiny_editor.hparams.prepend_bos is True
    without = mend(tiny_model, fact, editor=tiny_editor, prepend_bos=False)
    assert without.hparams["prepend_bos"] is False
    name = tiny_editor.names[0]
    assert not torch.allclose(default.deltas[name], without.deltas[name])
    assert tiny_model.cfg.default_prepend_bos is True  # the convention is restored


def test_editor_save_load_and_wrong_model(tiny_model, tiny_editor, tmp_path):
    path = tiny_editor.save(tmp_path / "ed.safetensors")
    loaded = MendEditor.load(path, tiny_model)
    fact = wb.Fact(subject="Mira Dosvi", template="{} plays the", target_true="piano", target_new="guitar")
    a, b = mend(tiny_model, fact, editor=tiny_editor), mend(tiny_model, fact, editor=str(path))
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    assert loaded.hparams == tiny_editor.hparams
    other = wb.random_model(n_layers=3, d_model=64, n_heads=4, seed=1, device="cpu")  # same shapes, other weights
    with pytest.raises(MendModelMismatch, match="trained for another model"):
        MendEditor.load(path, other)
    with pytest.raises(MendModelMismatch, match="another model"):
        mend(other, fact, editor=tiny_editor)
    wider = wb.random_model(n_layers=3, d_model=32, n_heads=4, seed=0, device="cpu")
    with pytest.raises(MendModelMismatch, match="shapes differ"):
        mend(wider, fact, editor=path)


def test_editor_file_is_sealed_metadata_included(tiny_editor, tmp_path):
    """A checksum over the whole editor record: a flipped tensor byte, a changed metadata field and
    a file without a checksum are refused, naming the file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tiny_editor.save(tmp_path / "ed.safetensors")
    loaded = MendEditor.load(path)
    assert loaded.content_hash == tiny_editor.content_hash and loaded.label == "ed.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1  # inside the last tensor's data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="flipped.safetensors.*SHA-256"):
        MendEditor.load(tmp_path / "flipped.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["workbench_mend"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert header["checksum"] == tiny_editor.content_hash
    for name, meta in (("renamed", {**header, "model_fingerprint": "0" * 16}),
                       ("unsealed", {k: v for k, v in header.items() if k != "checksum"})):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={"workbench_mend": json.dumps(meta)})
        with pytest.raises(IntegrityError, match=f"{name}.safetensors.*train"):
            MendEditor.load(tmp_path / f"{name}.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(IntegrityError, match="cut.safetensors"):
        MendEditor.load(tmp_path / "cut.safetensors")


def test_damaged_checkpoint_is_a_clear_error(tiny_model, train_facts, tmp_path, capsys):
    from workbench.cli import main

    hp = MendHyperParams(**TINY)
    train_mend(tiny_model, train_facts, hparams=hp, out=tmp_path, max_steps=2, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])  # truncated
    with pytest.raises(IntegrityError, match="checkpoint.pt.*delete"):
        train_mend(tiny_model, train_facts, hparams=hp, out=tmp_path, max_steps=4, progress=False)
    out = tmp_path / "cli"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    assert main(["train-mend", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "Traceback" not in err and "Unpickling" not in err


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "gpt_neox", "gpt_neo", "llama", "mistral", "qwen2"])
def test_low_rank_training_path_equals_applied_edit_on_families(family_models, train_facts, model_type, tmp_path):
    """The hooks used in training (y += -α (x X̃ᵀ) D̃) give the logits of the applied weight edit,
    for Conv1D (GPT-2) and every nn.Linear family (gated MLPs included)."""
    model = family_models(model_type)
    editor = quick_editor(model, train_facts, tmp_path, steps=2, n_blocks=1)
    names = default_inner_params(model, 1)
    assert editor.names == list(names)
    if model_type == "llama":
        assert [n.rsplit(".", 2)[-2] for n in names] == ["down_proj", "gate_proj", "up_proj"]
    fact = wb.Fact(subject="Varo Keltin", template="{} speaks", target_true="French", target_new="Korean")
    edit = mend(model, fact, editor=editor)
    modules = editor.check_model(model)
    rows = edit_rows(model, [(fact.prompt, fact.target_new)])
    editor.eval()
    with torch.no_grad():
        factors, _ = collect_factors(model, editor.weights, modules, rows)
        tf = editor.transform(factors)
        with editor.edited(modules, tf, torch.zeros(1, dtype=torch.long)):
            low_rank = logits_of(model, rows.ids)
        before = snapshot(model)
        with edit.applied(model):
            applied = logits_of(model, rows.ids)
        assert identical(model, before)
    assert torch.allclose(low_rank, applied, atol=1e-4, rtol=1e-4)
    for delta in edit.deltas.values():
        assert int(torch.linalg.matrix_rank(delta.float())) <= int(rows.lengths[0])


def test_training_lowers_validation_edit_loss(toy_model, train_facts, tmp_path):
    result = train_mend(toy_model, train_facts, hparams=MendHyperParams(**{**TINY, "n_blocks": 3}), out=tmp_path,
                        max_steps=10, progress=False)
    hist = result.report["history"]
    assert [h["step"] for h in hist] == [2, 4, 6, 8, 10]
    assert hist[-1]["edit_nll"] < hist[0]["edit_nll"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model_fingerprint"] == wb.loading.model_fingerprint(toy_model)
    assert report["hparams"]["rank"] == 16 and report["steps"] == 10
    assert report["hparams"]["prepend_bos"] is True  # the bundled model's convention, recorded
    assert (tmp_path / "editor.safetensors").exists()
    # a finished run returns its result again; other settings in the same folder are refused
    again = train_mend(toy_model, train_facts, hparams=MendHyperParams(**{**TINY, "n_blocks": 3}), out=tmp_path,
                       max_steps=10, progress=False)
    assert again.report["history"] == hist
    with pytest.raises(RuntimeError, match="fresh"):
        train_mend(toy_model, train_facts, hparams=MendHyperParams(**{**TINY, "rank": 8}), out=tmp_path,
                   max_steps=10, progress=False)


def test_counterfact_style_training_data(tiny_model, tmp_path):
    """CounterFact records train too: paraphrases are the equivalent prompts, neighborhood prompts the
    unrelated ones; explicit validation facts are used as given."""
    from workbench.editing.mend_train import batch_examples

    facts = wb.load_facts(REPO / "tests" / "fixtures" / "counterfact_small.json")
    ex = batch_examples(facts, 2, seed=0, step=0)
    for e in ex:
        fact = next(f for f in facts if f.prompt == e.edit_prompt)
        assert e.equiv_prompt in fact.paraphrases and e.loc_prompt in fact.neighborhood
    result = train_mend(tiny_model, facts, hparams=MendHyperParams(**{**TINY, "batch_size": 2}), out=tmp_path,
                        val_facts=facts, max_steps=2, progress=False)
    assert result.report["data"]["n_train_facts"] == 2 and result.report["validation"]["n"] == 2


def test_toy_training_subjects_are_disjoint_from_the_world():
    from workbench.loading import bundled_path
    from workbench.toyworld.world import World

    world = World.load(str(bundled_path() / "world.json"))
    facts = toy_training_facts(world, n_subjects=50)
    subjects = {f.subject for f in facts}
    assert len(subjects) == 50 and len(facts) == 50 * len(world.relations)
    assert not subjects & set(world.subjects)
    words = {w for s in world.subjects for w in s.split(" ")}
    assert all(len(s.split(" ")) == 3 and set(s.split(" ")) <= words for s in subjects)  # known words, new names
    for f in facts[:20]:
        assert f.target_new != f.target_true and len(f.paraphrases) == 26  # 3 clauses x (no opener + 8 openers) - 1
        assert all(f.subject not in p for p in f.neighborhood)


def test_toy_training_shares_no_template_with_the_evaluation_probes():
    """The shipped editor trains on biography-clause phrasings; the evaluation probes the relations'
    six templates (both families, bleed and locality): no template in common."""
    from workbench.editing.mend_train import probe_templates, training_templates

    probed = probe_templates(wb.load_facts("toy-facts"))
    assert len(probed) == 48  # 8 relations x 6 templates
    held_out = training_templates(toy_training_facts())
    assert len(held_out) == 8 * 27 and not held_out & probed
    old = training_templates(toy_training_facts(templates="probes"))
    assert old == probed  # what the earlier editor trained on: every probed template
    kinds = {wb.perspective.phrasing(f.prompt, f.subject) for f in toy_training_facts(n_subjects=20)}
    assert kinds == {"entity", "relation"}  # subject-first clauses and opener-first ones
    report = json.loads((shipped_editor_path().parent / "report.json").read_text())
    assert report["data"]["templates"] == "held-out" and report["data"]["probe_templates_shared"] == 0


def test_kill_and_resume_matches_uninterrupted_run(toy_model, tmp_path):
    """A `workbench train-mend` subprocess killed mid-run and rerun ends in the uninterrupted state."""
    sets = ["rank=16", "batch_size=4", "n_val=8", "val_every=4", "checkpoint_every=1", "n_blocks=2",
            "early_stop_patience=100", "lr=1e-3", "lr_lr=1e-3"]
    steps = 8
    cmd = [sys.executable, "-m", "workbench.cli", "train-mend", "--out", str(tmp_path / "killed"), "--threads", "1",
           "--steps", str(steps), "--no-progress"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                step = load_torch(ckpt)["state"]["step"]
            except Exception:  # noqa: BLE001 - replaced while reading
                step = 0
            if step >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
    proc.kill()
    proc.wait()
    killed_at = load_torch(ckpt)["state"]["step"]
    assert 3 <= killed_at < steps
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming from step {killed_at}" in resumed.stdout

    hp = MendHyperParams.from_dict({**MEND_TOY.to_dict(), **{k: json.loads(v) for k, v in
                                                            (s.split("=") for s in sets)}})
    straight = train_mend(toy_model, "toy-train", hparams=hp, out=tmp_path / "straight", max_steps=steps,
                          progress=False)
    a = MendEditor.load(tmp_path / "killed" / "editor.safetensors").state_dict()
    b = straight.editor.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    strip = lambda hist: [{k: v for k, v in h.items() if k != "elapsed_s"} for h in hist]  # noqa: E731
    assert strip(report["history"]) == strip(straight.report["history"])


@pytest.fixture(scope="module")
def shipped(toy_model):
    path = shipped_editor_path()
    assert path.exists(), "the bundled MEND editor is missing; rebuild it with `workbench train-mend --out assets/mend-toy`"
    return MendEditor.load(path, toy_model)


def test_shipped_editor_flips_held_out_facts_and_reverts(toy_model, shipped):
    facts = select_facts(wb.load_facts("toy-facts"), 40, seed=0)
    before = snapshot(toy_model)
    flipped = 0
    for fact in facts:
        edit = mend(toy_model, fact, editor=shipped)
        with edit.applied(toy_model):
            top = wb.top_tokens(toy_model, fact.prompt, k=1)[0][0]
        flipped += top.strip() == fact.target_new.strip()
        assert edit.info["reached"] == (top.strip() == fact.target_new.strip())  # single-token objects
    assert identical(toy_model, before)
    assert flipped / len(facts) >= 0.8, f"the shipped editor flipped {flipped}/{len(facts)} edit prompts"
    size = shipped_editor_path().stat().st_size
    assert size < 5_000_000


def test_mend_in_evaluate_with_the_shipped_editor(toy_model, shipped):
    facts = wb.load_facts("toy-facts")
    table = evaluate(toy_model, facts, methods=("mend",), requests=("entity",), n=3, progress=False,
                     raise_errors=True, n_boot=20)
    row = table.loc[("mend", "entity", "subject")]
    assert row[("n", "edits")] == 3 and row[("n", "failed")] == 0
    assert row[("entity", "reliability_score")] + row[("relation", "reliability_score")] > 0


def test_reproduce_takes_a_mend_editor(shipped, tmp_path):
    from workbench.cli import main

    out = tmp_path / "repro"
    assert main(["reproduce", "--out", str(out), "-n", "2", "--methods", "mend", "--requests", "relation",
                 "--mend-editor", str(shipped_editor_path().parent), "--bleed-subjects", "1", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines() if line.strip()]
    edited = [r for r in rows if r["method"] == "mend"]
    assert len(edited) == 2 and all(r["error"] is None for r in edited)


def test_inspector_offers_mend_and_undoes_it(toy_model, shipped):
    from workbench.loading import model_fingerprint
    from workbench.widgets import Inspector

    ins = Inspector(toy_model, prompt="The birthplace of Bruno Wenvi is", subject="Bruno Wenvi", samples=2,
                    background=False)
    assert ("MEND", "mend") in ins.method.options
    before = model_fingerprint(toy_model)
    assert wb.top_tokens(toy_model, "The birthplace of Bruno Wenvi is", k=1)[0][0] != " Tokyo"
    ins.method.value = "mend"
    ins.new_object.value = "Tokyo"
    ins.retrace.value = False
    edit = ins.apply_edit()
    assert ins.error is None, ins.error
    assert edit.method == "mend" and edit.is_applied(toy_model) and edit.info["reached"]
    assert ins.undo_edit() is not None and model_fingerprint(toy_model) == before


def test_cli_lists_train_mend():
    from workbench.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train-mend", "--out", "x", "--set", "lr=1e-5"])
    assert args.command == "train-mend" and args.set == ["lr=1e-5"]


def test_results_key_on_the_editor_content_and_rows_name_it(toy_model, shipped, tmp_path):
    """The evaluation's key holds the editor's SHA-256: an editor file replaced in place is refused
    by the folder its predecessor filled; every row names the editor and its hash."""
    import shutil

    from workbench.store import StoreMismatchError

    ed_dir = tmp_path / "my-editor"
    ed_dir.mkdir()
    shutil.copy(shipped_editor_path(), ed_dir / "editor.safetensors")
    kw = dict(methods=("mend",), requests=("entity",), n=2, progress=False, n_boot=10, baseline=False,
              out=tmp_path / "run", method_kwargs={"mend": {"editor": str(ed_dir)}})
    evaluate(toy_model, wb.load_facts("toy-facts"), **kw)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["key"]["methods"]["mend"]["hparams"]["editor_sha256"] == shipped.content_hash
    rows = [json.loads(line) for line in (tmp_path / "run" / "details.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2
    for r in rows:
        assert r["preset"] == "mend:my-editor" and r["info_editor"] == "my-editor"
        assert r["info_editor_sha256"] == shipped.content_hash and r["info_factor_positions"] == "all"
    changed = MendEditor.load(ed_dir)
    with torch.no_grad():
        changed.alphas.mul_(2)
    changed.save(ed_dir / "editor.safetensors")  # same path, other content
    with pytest.raises(StoreMismatchError) as info:
        evaluate(toy_model, wb.load_facts("toy-facts"), **kw)
    assert "key.methods.mend.hparams.editor_sha256" in info.value.fields


def test_an_editor_of_another_model_is_refused_up_front(toy_model, tiny_editor, tmp_path, capsys):
    from workbench.cli import main
    from workbench.evaluation.methods import resolve_method, usable_methods

    path = tiny_editor.save(tmp_path / "tiny-editor.safetensors")
    facts = wb.load_facts("toy-facts")
    with pytest.raises(MendModelMismatch, match="MEND cannot edit this model.*another model"):
        evaluate(toy_model, facts, methods=("mend",), n=2, progress=False, method_kwargs={"mend": {"editor": path}})
    out = tmp_path / "repro"
    assert main(["reproduce", "--out", str(out), "-n", "2", "--methods", "mend", "--mend-editor", str(path),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "another model" in err and "Traceback" not in err
    assert not (out / "details.jsonl").exists() or not (out / "details.jsonl").read_text().strip()
    # among the default methods, MEND without a fitting editor is left out with a warning
    with pytest.warns(UserWarning, match="mend is left out"):
        kept = usable_methods(toy_model, [resolve_method("mend"), resolve_method("ft")],
                              {"mend": {"editor": path}}, explicit=False)
    assert [name for name, _ in kept] == ["ft"]
