"""MEND checkpoints of the originals' code: read, converted (sign, statistics, key names) and checked
against a direct re-derivation of the originals' edit (eric-mitchell/mend ``algs/mend.py``, ``nn.py``)."""

from __future__ import annotations

import json

import pytest
import torch

import workbench as wb
from workbench.editing.mend import edit_rows, mend
from workbench.editing.mend_hparams import MendHyperParams
from workbench.editing.mend_original import OriginalCheckpointError, load_original
from workbench.spans import bos_convention

# the tiny model's last two blocks, in the originals' inner_params order (c_proj, c_fc per block)
INNER = ("transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_fc.weight",
         "transformer.h.2.mlp.c_proj.weight", "transformer.h.2.mlp.c_fc.weight")
RANK = 8

pytestmark = [pytest.mark.filterwarnings("ignore::workbench.editing.edit.EditNotReachedWarning"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]  # the reference's hooks


def original_state(d_model: int = 64, d_mlp: int = 256, prefix: str = "mend", seed: int = 0, n_blocks: int = 2) -> dict:
    """A MEND.state_dict() as the originals write it: shared networks keyed by shape, combine,
    n_hidden = 1 (two LRLinear layers), two modes per shape, statistics, edit_lrs (nonzero U so the
    network is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    state: dict = {}
    for d_in, d_out in ((d_mlp, d_model), (d_model, d_mlp)):  # c_proj, c_fc
        key = f"{prefix}.({d_in}, {d_out})"
        width = d_in + d_out
        for layer in range(2):
            base = f"{key}.mlp.layers.{layer}"
            state[f"{base}.u"] = torch.randn(width, RANK, generator=g) * 0.05
            state[f"{base}.v"] = torch.randn(RANK, width, generator=g)
            state[f"{base}.bias"] = torch.randn(width, generator=g) * 0.01
            state[f"{base}.mode_scale.weight"] = 1 + 0.1 * torch.randn(n_blocks, width, generator=g)
            state[f"{base}.mode_shift.weight"] = 0.01 * torch.randn(n_blocks, width, generator=g)
        k = torch.tensor([57.0])
        for side, dim in (("u", d_in), ("v", d_out)):
            s = torch.rand(dim, generator=g) * (k - 1) + 1e-3
            state[f"{key}.{side}_mean"] = torch.randn(dim, generator=g) * 0.1
            state[f"{key}.{side}_s"] = s
            state[f"{key}.{side}_std"] = (s / (k - 1)) ** 0.5
        state[f"{key}.k"] = k
    state["edit_lrs"] = torch.tensor([1e-2 * (i + 1) for i in range(2 * n_blocks)])
    return state


def write_checkpoint(path, state, model) -> None:
    """``trainer.py``'s ``save_state`` archive, the model's HF config object included."""
    hf = model.original_model if hasattr(model, "original_model") else model
    torch.save({"model": {**state, "model_config": hf.config}, "opt": {}, "lr_opt": None, "val_stats": {},
                "start_time": "", "elapsed_time": 0.0, "step": 10}, path)


def reference_update(model, state, prompt: str, target: str) -> dict[str, torch.Tensor]:
    """The originals' edit, re-derived: full backward hooks record x and δ, rows with a zero x or δ
    are dropped (nz_mask), normalised by u_mean/u_std, IDMLP of LRLinear layers (clamp, residual,
    mode scale/shift), grad = einsum('bi,bj->ij') (GPT-2 Conv1D), update = +edit_lr * grad."""
    from workbench.editing.edit import _hf

    hf = _hf(model)
    with bos_convention(model, False):
        rows = edit_rows(model, [(prompt, target)])
    mods = {n: hf.get_submodule(n.rsplit(".", 1)[0]) for n in INNER}
    xs, ds, handles = {}, {}, []
    for n, m in mods.items():
        handles.append(m.register_forward_hook(lambda mod, a, o, n=n: xs.__setitem__(n, a[0].detach())))
        handles.append(m.register_full_backward_hook(lambda mod, gi, go, n=n: ds.__setitem__(n, go[0].detach())))
    params = [m.weight for m in mods.values()]
    for p in params:
        p.requires_grad_(True)
    try:
        logits = hf(input_ids=rows.ids).logits
        logp = torch.log_softmax(logits[rows.tgt_row, rows.tgt_pos].float(), -1)
        nll = -logp.gather(1, rows.tgt_id[:, None]).mean()
        torch.autograd.grad(nll, params)
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(False)
    out = {}
    shapes = {}
    for i, n in enumerate(INNER):
        w = mods[n].weight
        shape = tuple(w.shape)
        shapes.setdefault(shape, []).append(n)
        mode = shapes[shape].index(n)
        key = f"mend.({shape[0]}, {shape[1]})"
        u = xs[n].reshape(-1, shape[0]).float()
        v = ds[n].reshape(-1, shape[1]).float()
        nz = (u != 0).any(-1) & (v != 0).any(-1)
        u, v = u[nz], v[nz]
        h = torch.cat([(u - state[f"{key}.u_mean"]) / (state[f"{key}.u_std"] + 1e-7),
                       (v - state[f"{key}.v_mean"]) / (state[f"{key}.v_std"] + 1e-7)], -1)
        for layer in range(2):
            b = f"{key}.mlp.layers.{layer}"
            pre = (state[f"{b}.u"] @ (state[f"{b}.v"] @ h.T)).T + state[f"{b}.bias"]
            pre = pre * state[f"{b}.mode_scale.weight"][mode] + state[f"{b}.mode_shift.weight"][mode]
            h = pre.clamp(min=0) + h
        tu, tv = h.split([shape[0], shape[1]], -1)
        out[n] = state["edit_lrs"][i] * torch.einsum("bi,bj->ij", tu, tv)
    return out


def test_original_checkpoint_gives_the_originals_update(tiny_model, tmp_path):
    state = original_state()
    path = tmp_path / "mend-gpt2-tiny.pt"
    write_checkpoint(path, state, tiny_model)
    editor = load_original(path, tiny_model, MendHyperParams(inner_params=INNER, prepend_bos=False))
    assert editor.hparams.rank == RANK and editor.hparams.n_hidden == 1 and editor.hparams.combine
    assert editor.hparams.factor_positions == "all"
    assert torch.allclose(editor.alphas, -state["edit_lrs"])  # their W + lr·g is our W - α·g
    fact = wb.Fact(subject="Varo Keltin", template="The birthplace of {} is", target_true="Rome")
    edit = mend(tiny_model, fact, " Paris", editor=editor, prepend_bos=False)
    expected = reference_update(tiny_model, state, fact.prompt, " Paris")
    for name in INNER:
        assert expected[name].abs().max() > 0
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(edit.deltas[name], expected[name], rtol=1e-3, atol=1e-6 * scale)
    # saved as a workbench editor, it edits identically
    again = mend(tiny_model, fact, " Paris", editor=editor.save(tmp_path / "converted.safetensors"),
                 prepend_bos=False)
    assert all(torch.equal(again.deltas[n], edit.deltas[n]) for n in INNER)


def test_romes_gtn_prefix_and_refusals(tiny_model, tmp_path):
    state = {k.replace("mend.", "gtn.", 1): v for k, v in original_state().items()}
    path = tmp_path / "mend-10tok-tiny.pt"
    write_checkpoint(path, state, tiny_model)
    editor = load_original(path, tiny_model, MendHyperParams(inner_params=INNER))
    assert sorted(editor.nets) == ["256x64", "64x256"]
    with pytest.raises(OriginalCheckpointError, match="4 edit_lrs but 6"):
        load_original(path, tiny_model, MendHyperParams(n_blocks=3))
    other = wb.random_model(n_layers=3, d_model=32, n_heads=4, seed=0, device="cpu")
    with pytest.raises(ValueError, match="shape|fit"):
        load_original(path, other, MendHyperParams(inner_params=INNER))
    (tmp_path / "broken.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(OriginalCheckpointError, match="broken.pt"):
        load_original(tmp_path / "broken.pt", tiny_model, MendHyperParams(inner_params=INNER))
    torch.save({"model": {"something": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(OriginalCheckpointError, match="edit_lrs"):
        load_original(tmp_path / "other.pt", tiny_model, MendHyperParams(inner_params=INNER))


def test_an_originals_checkpoint_serves_as_the_editor_of_an_evaluation(tiny_model, tmp_path):
    """``editor="....pt"`` (``--mend-editor``) converts the originals' checkpoint for the model with its
    MEND preset (here the generic one: the last three blocks, c_proj and c_fc in the originals' order)."""
    from workbench.editing.presets import UnknownModelWarning
    from workbench.evaluation import evaluate

    path = tmp_path / "mend-tiny.pt"
    write_checkpoint(path, original_state(n_blocks=3), tiny_model)
    facts = [wb.Fact(subject="Varo Keltin", template="The birthplace of {} is", target_true="Rome",
                     target_new="Paris", relation_id="P19", id=0,
                     entity_prompts=("Varo Keltin was born in",), relation_prompts=("The birthplace of Varo Keltin is",))]
    with pytest.warns(UnknownModelWarning):
        table = evaluate(tiny_model, facts, methods=("mend",), requests=("entity",), progress=False, n_boot=10,
                         raise_errors=True, baseline=False, out=tmp_path / "run",
                         method_kwargs={"mend": {"editor": str(path)}})
    assert table.loc[("mend", "entity", "subject"), ("n", "failed")] == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "details.jsonl").read_text().splitlines() if line]
    assert rows[0]["info_editor"] == "mend-tiny.pt" and rows[0]["preset"] == "mend:mend-tiny.pt"
