"""The weights' fingerprint is hashed once per weight state and never answers for other weights."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench import weights
from workbench.architecture import FAMILY_NAMES
from workbench.editing import Edit
from workbench.loading import canonical_hf_name, hf_model, hf_state_dict, model_fingerprint, random_model

W_OUT = "transformer.h.1.mlp.c_proj.weight"
HASH = weights._compute_fingerprint  # the uncached hash (the counting fixture replaces the module's)


@pytest.fixture
def model():
    """A fresh model per test: these tests change its weights."""
    return random_model(n_layers=2, d_model=32, n_heads=4, seed=3, device="cpu")


@pytest.fixture
def hashes(monkeypatch):
    """How many fingerprints were hashed from the weights (not answered from the cache)."""
    calls = [0]
    compute = weights._compute_fingerprint

    def counted(tensors):
        calls[0] += 1
        return compute(tensors)

    monkeypatch.setattr(weights, "_compute_fingerprint", counted)
    return calls


def fresh(model) -> str:
    """The fingerprint hashed from the weights as they are now."""
    return HASH(hf_state_dict(model))


def test_hashed_once_per_state(model, hashes):
    first = model_fingerprint(model)
    assert [model_fingerprint(model) for _ in range(3)] == [first] * 3
    assert hashes[0] == 1
    assert model_fingerprint(model, refresh=True) == first and hashes[0] == 2


def mutations():
    """Changes made outside the workbench, each a function (model, parameter) -> None."""

    def indexed(m, p):
        with torch.no_grad():
            p[0, 0] += 1.0

    def detached(m, p):
        p.detach().mul_(1.5)

    def optimizer_step(m, p):
        opt = torch.optim.SGD([p], lr=0.1)
        p.grad = torch.ones_like(p)
        opt.step()
        p.grad = None

    def load_state_dict(m, p):
        live = hf_model(m).state_dict(keep_vars=True)  # the bridge lists p under several names
        state = {k: v.detach() + 0.5 if v is p else v.detach().clone() for k, v in live.items()}
        hf_model(m).load_state_dict(state)

    def assign_data(m, p):
        p.data = p.data + 1.0

    def new_parameter(m, p):
        owner = m.original_model.transformer.h[1].mlp.c_proj
        owner.weight = torch.nn.Parameter(p.detach() * 2.0)

    def new_module(m, p):
        block = m.original_model.transformer.h[1].mlp
        replacement = copy.deepcopy(block.c_proj)
        with torch.no_grad():
            replacement.weight.mul_(-1.0)
        block.c_proj = replacement

    return [indexed, detached, optimizer_step, load_state_dict, assign_data, new_parameter, new_module]


@pytest.mark.parametrize("mutate", mutations(), ids=lambda f: f.__name__)
def test_weights_changed_outside_the_workbench_change_it(model, mutate):
    before = model_fingerprint(model)
    mutate(model, hf_state_dict(model)[W_OUT])
    after = model_fingerprint(model)
    assert after != before
    assert after == fresh(model)  # the cached answer is the hash of the weights as they are now


def test_writes_into_dot_data_need_refresh(model):
    """The one write PyTorch hides from version counters; ``refresh=True`` sees it."""
    before = model_fingerprint(model)
    hf_state_dict(model)[W_OUT].data.add_(1.0)
    assert model_fingerprint(model, refresh=True) == fresh(model) != before
    assert model_fingerprint(model) == fresh(model)  # the refreshed value is what is cached


def delta_edit(model, name: str, scale: float = 0.1, seed: int = 0) -> Edit:
    param = hf_state_dict(model)[name]
    g = torch.Generator().manual_seed(seed)
    return Edit({name: torch.randn(param.shape, generator=g) * scale}, model_fingerprint=model_fingerprint(model))


def test_apply_changes_it_and_revert_restores_it_without_hashing(model, hashes):
    before = model_fingerprint(model)
    edit = delta_edit(model, W_OUT)
    edit.apply(model)
    applied = model_fingerprint(model)
    assert applied != before and applied == fresh(model)
    n = hashes[0]
    edit.revert(model)
    assert model_fingerprint(model) == before == fresh(model)
    assert hashes[0] == n  # the reverted weights are the remembered ones: not hashed again
    with edit.applied(model):  # apply checks the fingerprint: answered from the cache
        pass
    assert model_fingerprint(model) == before and hashes[0] == n


def test_revert_with_another_edit_still_applied(model):
    before = model_fingerprint(model)
    a = delta_edit(model, W_OUT, seed=1)
    b = delta_edit(model, "transformer.h.0.mlp.c_proj.weight", seed=2)
    a.apply(model)
    b.apply(model, force=True)
    a.revert(model)  # b is still applied: the pre-a fingerprint must not come back
    assert model_fingerprint(model) == fresh(model) != before
    b.revert(model)
    assert model_fingerprint(model) == before == fresh(model)


def test_revert_after_an_outside_change(model):
    before = model_fingerprint(model)
    edit = delta_edit(model, W_OUT)
    edit.apply(model)
    with torch.no_grad():
        hf_state_dict(model)["transformer.h.0.mlp.c_fc.weight"][0, 0] += 1.0  # not the edit's weight
    edit.revert(model)
    assert model_fingerprint(model) == fresh(model) != before


def test_failed_apply_keeps_the_fingerprint(model, hashes, monkeypatch):
    before = model_fingerprint(model)
    edit = delta_edit(model, W_OUT)

    def failing(tensor):
        raise RuntimeError("device lost")

    monkeypatch.setattr("workbench.editing.edit._checksum", failing)  # fails after the delta was added
    with pytest.raises(RuntimeError, match="device lost"):
        edit.apply(model)
    n = hashes[0]
    assert model_fingerprint(model) == before == fresh(model) and hashes[0] == n


def reference_state_dict(model) -> dict[str, torch.Tensor]:
    """``hf_state_dict`` as the ``state_dict()`` walk it replaces."""
    found: dict[str, torch.Tensor] = {}
    for name, tensor in hf_model(model).state_dict(keep_vars=True).items():
        found.setdefault(canonical_hf_name(name), tensor)
    return {n: found[n] for n in weights._hf_names(model)}


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_hf_state_dict_is_the_state_dict_walk(family_models, model_type):
    model = family_models(model_type)
    ours, ref = hf_state_dict(model), reference_state_dict(model)
    assert list(ours) == list(ref)
    assert all(ours[n] is ref[n] for n in ref)
