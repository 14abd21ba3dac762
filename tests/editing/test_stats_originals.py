"""Covariance like the originals: their published layer_stats .npz files, and Wikipedia-shaped article corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import workbench.editing.stats as stats_mod
from workbench.cli import main
from workbench.editing import rome
from workbench.editing.corpus import resolve_corpus
from workbench.editing.stats import LayerStats, layer_stats, npz_layer_stats
from workbench.evaluation.run import evaluation_key, resolve_method
from workbench.facts import Fact
from workbench.loading import save_hf

FACT = Fact(subject="Varo Keltin", template="The mother tongue of {} is", target_true="French", target_new="Tuvan",
            relation_id="P103", id=1)
HP = {"context_templates": ["{}"], "v_num_grad_steps": 3, "v_loss_layer": None}


def write_original_npz(folder, layer: int, keys: torch.Tensor, name: str = "c_proj") -> str:
    """An .npz as rome/layer_stats.py writes it: CombinedStat(mom2=SecondMoment()).state_dict() plus the
    tally's sample_size (util/runningstats.py: mom2.mom2 is the *sum* of k kᵀ, float32 on GPU)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"transformer.h.{layer}.mlp.{name}_float32_mom2_100000.npz"
    k = keys.double()
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(k.shape[0]), "mom2.mom2": (k.T @ k).float().numpy(),
                      "sample_size": np.array(100000)})
    return str(path)


@pytest.fixture()
def npz_dir(tiny_model, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "stats" / "gpt2-xl" / "wikipedia_stats"
    for layer in (0, 1, 2):
        write_original_npz(folder, layer, torch.randn(500, tiny_model.cfg.d_mlp))
    return tmp_path / "stats"


def test_npz_is_read_as_the_originals_moment(tiny_model, npz_dir):
    path = next(npz_dir.rglob("*h.1.mlp*"))
    with np.load(path) as data:
        expected = torch.from_numpy(data["mom2.mom2"].astype(np.float64)) / int(data["mom2.count"])
    s = npz_layer_stats(npz_dir, 1, tiny_model)  # a folder: found by the originals' file name
    assert isinstance(s, LayerStats) and s.n_tokens == 500 and s.mom2.dtype == torch.float64
    assert torch.equal(s.mom2, expected) and s.info["sample_size"] == 100000 and s.corpus.startswith("npz-")
    assert torch.equal(npz_layer_stats(path, 1, tiny_model).mom2, expected)  # the file itself
    with pytest.raises(ValueError, match="layer 1's statistics, not layer 2's"):
        npz_layer_stats(path, 2)
    with pytest.raises(FileNotFoundError, match="no file of layer 5"):
        npz_layer_stats(npz_dir, 5)


def test_npz_errors_name_the_file(tiny_model, tmp_path):
    bad = tmp_path / "transformer.h.0.mlp.c_proj_float32_mom2_100000.npz"
    np.savez(bad, count=np.array(3))
    with pytest.raises(ValueError, match=r"lacks \['mom2.mom2', 'mom2.count'\]"):
        npz_layer_stats(bad, 0)
    other = write_original_npz(tmp_path / "other", 0, torch.randn(10, 32))
    with pytest.raises(ValueError, match="another model's"):
        npz_layer_stats(other, 0, tiny_model)
    with pytest.raises(FileNotFoundError):
        npz_layer_stats(tmp_path / "missing", 0)


def test_rome_with_a_path_equals_rome_with_the_loaded_statistics(tiny_model, npz_dir):
    a = rome(tiny_model, FACT, layer=1, hparams=HP, stats=str(npz_dir))
    b = rome(tiny_model, FACT, layer=1, hparams=HP, stats=npz_layer_stats(npz_dir, 1, tiny_model).mom2)
    assert a.deltas.keys() == b.deltas.keys()
    for name in a.deltas:
        torch.testing.assert_close(a.deltas[name], b.deltas[name], rtol=0, atol=0)
    assert a.info["layers"][0]["cov"]["corpus"].startswith("npz-")


def test_evaluation_key_holds_the_npz_content(tiny_model, npz_dir):
    resolved = [resolve_method("rome")]
    kwargs = {"rome": {"stats": str(npz_dir), "layer": 1}}
    before = evaluation_key(tiny_model, [FACT], resolved, kwargs, seed=0)
    sha = before["methods"]["rome"]["kwargs"]["stats"]["npz"][1]
    assert sha == npz_layer_stats(npz_dir, 1).info["sha256"] and "corpus" not in before["methods"]["rome"]
    path = next(npz_dir.rglob("*h.1.mlp*"))
    write_original_npz(path.parent, 1, torch.randn(20, tiny_model.cfg.d_mlp))  # replaced in place
    after = evaluation_key(tiny_model, [FACT], resolved, kwargs, seed=0)
    assert after["methods"]["rome"]["kwargs"]["stats"] != before["methods"]["rome"]["kwargs"]["stats"]


def test_article_corpus_is_one_article_per_row(tiny_model, tmp_path):
    articles = [f"Article {i}: Varo Keltin was born in Osla. " * (3 + 4 * i) for i in range(5)]
    file = tmp_path / "wiki.jsonl"
    file.write_text("\n".join(json.dumps({"id": i, "title": f"T{i}", "text": t}) for i, t in enumerate(articles)))
    s = layer_stats(tiny_model, 1, corpus=f"articles:{file}", n_samples=3, cache_dir=tmp_path, progress=False)
    # direct: each of the first 3 articles alone, its first n_ctx tokens, no BOS, every token counted
    keys = []
    for text in articles[:3]:
        ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"][: tiny_model.cfg.n_ctx]
        _, cache = tiny_model.run_with_cache(torch.tensor([ids]), names_filter="blocks.1.mlp.hook_post")
        keys.append(cache["blocks.1.mlp.hook_post"][0].double())
    k = torch.cat(keys)
    assert any(len(tiny_model.tokenizer(t)["input_ids"]) > tiny_model.cfg.n_ctx for t in articles[:3])  # truncation
    assert s.n_tokens == k.shape[0] and "a3" in s.corpus
    torch.testing.assert_close(s.mom2, k.T @ k / k.shape[0], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="line 2: not a JSON object with a 'text' field"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\nnot json\n')
        resolve_corpus(tiny_model, f"articles:{bad}")


def test_wikipedia_offline_fails_with_a_clear_message(tiny_model, tmp_path, monkeypatch):
    import workbench.loading as loading

    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: (False, "no network in this test"))
    with pytest.raises(RuntimeError, match=r"Wikipedia \(wikipedia 20200501.en, one article per row.*--stats-npz"):
        layer_stats(tiny_model, 0, corpus="wikipedia", cache_dir=tmp_path, progress=False)


def test_cli_edit_with_stats_npz(tiny_model, npz_dir, tmp_path, capsys):
    folder = save_hf(tiny_model, tmp_path / "model")
    code = main(["edit", "--model", str(folder), "--device", "cpu", "--subject", "Varo Keltin", "--prompt",
                 "The mother tongue of {} is", "--new-object", "Tuvan", "--layer", "1", "--stats-npz", str(npz_dir)])
    out = capsys.readouterr().out
    assert code == 0 and "rome:generic+custom" in out and "ROME edit" in out
    assert main(["edit", "--model", str(folder), "--device", "cpu", "--subject", "Varo Keltin", "--prompt",
                 "The mother tongue of {} is", "--new-object", "Tuvan", "--stats-npz", str(tmp_path / "none")]) == 1
    assert stats_mod.NPZ_KEYS == ("mom2.mom2", "mom2.count")


def test_shared_stats_for_workers_read_the_npz_once(tiny_model, npz_dir):
    from workbench.evaluation.methods import with_shared_stats

    out = with_shared_stats(tiny_model, [resolve_method("rome"), resolve_method("memit")],
                            {"rome": {"stats": str(npz_dir), "layer": 2}, "memit": {"stats": str(npz_dir),
                                                                                    "layers": [0, 1]}})
    assert set(out["rome"]["stats"]) == {2} and set(out["memit"]["stats"]) == {0, 1}
    assert torch.equal(out["memit"]["stats"][1].mom2, npz_layer_stats(npz_dir, 1).mom2)
