"""Request perspectives in evaluate(), probe families and bleed, teacher-forced metrics, intervals, the tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.editing import Edit
from workbench.evaluation import (BASELINE, METHOD_LABELS, METHODS, METRICS, VARIANTS, bootstrap_ci, cells_for,
                                  cube_table, default_methods, evaluate, evaluate_one, paper_table, register_method, score_fact,
                                  score_objects, score_probes, select_facts, summarize, to_markdown, write_tables)
from workbench.facts import Fact, load_facts
from workbench.loading import hf_parameter, model_fingerprint
from workbench.perspective import phrasings, probes
from workbench.predict import object_token_ids
from workbench.spans import tokenize

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "toy-facts" / "model.safetensors"
needs_bundled = pytest.mark.skipif(not BUNDLED.exists(), reason="bundled model not built")

SUBJECTS = [("Varo Keltin", "French", "Polish"), ("Mira Dos", "German", "Greek"),
            ("Toko Yasuda", "Japanese", "Italian"), ("Lena Hart", "Dutch", "Spanish")]  # new objects: one token


def _fact(i: int, subject: str, old: str, new: str) -> Fact:
    return Fact(subject=subject, template="The mother tongue of {} is", target_true=old, target_new=new,
                relation_id="P103", paraphrases=(f"{subject} speaks",),
                neighborhood=("Miles Davis speaks", "The mother tongue of Ann Kel is"),
                neighborhood_targets=("English", "Japanese"), id=i)


FACTS = [_fact(i, *s) for i, s in enumerate(SUBJECTS)]
ROW_KEYS = {f"{fam}_{m}_{v}" for fam, m in METRICS for v in VARIANTS}


# ------------------------------------------------------------------ scoring
def _direct(model, prompt: str, obj: str) -> tuple[float, bool, float]:
    ids = list(tokenize(model, prompt).ids)
    o = object_token_ids(model, obj)
    logits = model(torch.tensor([ids + o]), return_type="logits")[0]
    lp = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(o)].float(), -1)
    hits = lp.argmax(-1) == torch.tensor(o)
    return float(lp[torch.arange(len(o)), torch.tensor(o)].mean()), bool(hits.all()), float(hits.float().mean())


def test_score_objects_matches_direct(tiny_model):
    pairs = [("The mother tongue of Varo Keltin is", "Tuvan"), ("The mother tongue of Varo Keltin is", "French"),
             ("Miles Davis speaks", "the trumpet and French"), ("Toko Yasuda speaks", "Japanese")]
    assert len(object_token_ids(tiny_model, pairs[2][1])) > 2  # a multi-token object
    got = score_objects(tiny_model, pairs, batch_size=3)
    for (p, o), s in zip(pairs, got):
        lp, ok, tok = _direct(tiny_model, p, o)
        assert s.mean_logprob == pytest.approx(lp, abs=1e-4) and s.correct == ok and s.token_acc == pytest.approx(tok)


def test_score_probes_keys_range_and_request_view(tiny_model):
    ps = probes(FACTS[0], [("Mira Dos", "German")])
    res = score_probes(tiny_model, FACTS[0], ps, "relation")
    assert set(res) == ROW_KEYS
    assert all(math.isnan(v) or (-1 <= v <= 1 if "_adj_" in k else 0 <= v <= 1) for k, v in res.items())
    for v in VARIANTS:  # the request family is the relation-phrased one, transfer the entity-phrased one
        assert res[f"request_reliability_{v}"] == res[f"relation_reliability_{v}"]
        assert (res[f"transfer_generality_{v}"] == res[f"entity_generality_{v}"]
                or math.isnan(res[f"entity_generality_{v}"]))
    assert math.isnan(score_fact(tiny_model, FACTS[0])["request_reliability_acc"])  # no request: no view
    with pytest.raises(ValueError):
        score_fact(tiny_model, Fact(subject="A B", template="{} speaks", target_true="French"))


@pytest.mark.parametrize("new, old", [("is is", "French"), ("is French", "Polish Greek"), ("French Polish", "is is")])
def test_accuracy_variants_on_multi_token_objects(tiny_model, new, old):
    """`_acc` (every object token is the argmax), `_tok` (share of them) and `_score` (mean token log-prob of
    o* above o's) of multi-token objects, re-derived by one plain forward pass per (prompt, object)."""
    assert len(object_token_ids(tiny_model, new)) == 2 and len(object_token_ids(tiny_model, old)) >= 1
    fact = Fact(subject="Varo Keltin", template="The mother tongue of {} is", target_true=old, target_new=new,
                relation_id="P103", entity_prompts=("Varo Keltin speaks",),
                relation_prompts=("The mother tongue of Varo Keltin is", "The native language of Varo Keltin is"))
    res = score_probes(tiny_model, fact, probes(fact), "relation")
    for family, prompts in (("relation_reliability", fact.relation_prompts[:1]),
                            ("relation_generality", fact.relation_prompts[1:]), ("entity_reliability", ("Varo Keltin speaks",))):
        direct = [(_direct(tiny_model, p, new), _direct(tiny_model, p, old)) for p in prompts]
        assert res[f"{family}_acc"] == pytest.approx(np.mean([n[1] for n, _ in direct]))
        assert res[f"{family}_tok"] == pytest.approx(np.mean([n[2] for n, _ in direct]))
        assert res[f"{family}_score"] == pytest.approx(np.mean([n[0] > o[0] for n, o in direct]))
    if new == "is French":  # the first token is the model's argmax, the second is not: the variants differ
        assert res["relation_reliability_acc"] == 0.0 and res["relation_reliability_tok"] == 0.5


# ------------------------------------------------------------------ evaluate
def _fake(model, fact, locus="subject"):
    """A deterministic stand-in edit (fast) that depends on the request prompt: nudges one W_out row."""
    name = "transformer.h.1.mlp.c_proj.weight"
    d = torch.zeros_like(hf_parameter(model, name))
    d[len(fact.prompt) % d.shape[0]] = 0.5
    return Edit(deltas={name: d}, method="fake", locus=locus)


def _failing(model, fact, locus="subject"):
    raise ValueError("cannot edit this")


def test_evaluate_cells_baseline_resume(tiny_model, tmp_path):
    before = model_fingerprint(tiny_model)
    out = tmp_path / "run"
    df = evaluate(tiny_model, FACTS, methods=(_fake, "ft", _failing), out=out, progress=False, check_every=1,
                  method_kwargs={"ft": {"steps": 2}}, n_boot=50)
    assert model_fingerprint(tiny_model) == before
    assert list(df.index) == [(BASELINE, "entity", "-"), (BASELINE, "relation", "-"),
                              ("_fake", "entity", "subject"), ("_fake", "relation", "relation"),
                              ("ft", "entity", "subject"), ("ft", "relation", "relation"),
                              ("_failing", "entity", "subject"), ("_failing", "relation", "relation")]
    assert df[("n", "edits")].tolist() == [4, 4, 4, 4, 4, 4, 0, 0]
    assert df.loc[("_failing", "entity", "subject"), ("n", "failed")] == 4
    details = df.attrs["details"]
    # FT gets the request: its rows differ between the perspectives
    ft_rows = details[details["method"] == "ft"].set_index(["request", "fact_id"])
    for f in FACTS:
        ent, rel = ft_rows.loc[("entity", f.id)], ft_rows.loc[("relation", f.id)]
        assert ent["request_prompt"] == f"{f.subject}'s mother tongue is" or ent["request_prompt"].startswith(f.subject)
        assert rel["request_prompt"] == f.prompt and ent["edit_norm"] != rel["edit_norm"]
        assert ent["preset"] == "ft-generic+custom"
    # the baseline rows are the unedited model's scores on the same probes
    row = details[(details["method"] == BASELINE) & (details["request"] == "entity")].iloc[0]
    assert row["locality_locality_acc"] == score_fact(tiny_model, FACTS[0])["locality_locality_acc"]
    long = df.attrs["long"]
    assert set(long.columns) >= {"method", "request", "locus", "family", "measure", "variant", "mean", "lo", "hi", "n"}
    lines = (out / "details.jsonl").read_text().splitlines()
    assert len(lines) == 8 * 4 and (out / "summary.csv").exists()
    # resume: a cut-off last line is redone, nothing else
    (out / "details.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    calls = []

    def counting(model, fact, locus="subject"):
        calls.append(fact.id)
        raise ValueError("cannot edit this")
    counting.__name__ = "_failing"
    again = evaluate(tiny_model, FACTS, methods=(_fake, "ft", counting), out=out, progress=False,
                     method_kwargs={"ft": {"steps": 2}}, n_boot=50)
    assert calls == [FACTS[-1].id]
    pd.testing.assert_frame_equal(again, df)


def test_evaluate_refuses_other_model_folder(tiny_model, tmp_path):
    out = tmp_path / "run"
    evaluate(tiny_model, FACTS[:1], methods=(), out=out, progress=False, n_boot=10)
    cfg = json.loads((out / "config.json").read_text())
    cfg["key"]["model_fingerprint"] = "0" * 16
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="model_fingerprint"):
        evaluate(tiny_model, FACTS[:1], methods=(), out=out, progress=False, n_boot=10)


def test_evaluate_refuses_other_facts_kwargs_or_hparams_in_one_folder(tiny_model, tmp_path):
    """Rows are keyed by the facts' content, the kwargs and the resolved hyperparameters with the preset name."""
    from workbench.store import StoreMismatchError

    out = tmp_path / "run"
    kw = dict(methods=("ft",), requests=("entity",), out=out, progress=False, n_boot=10)
    evaluate(tiny_model, FACTS[:2], method_kwargs={"ft": {"steps": 1}}, **kw)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["key"]["methods"]["ft"]["hparams"]["preset"] == "ft-generic+custom"
    assert cfg["key"]["model_identity"]["key"] is None and cfg["key"]["model_identity"]["signature"]["n_layers"] == 3
    rows = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines() if line.strip()]
    assert {r["model_identity"] for r in rows} == {"unknown gpt2 (L3, d_model 64, heads 4, d_mlp 256, vocab 1089, ctx 64)"}
    assert cfg["key"]["probe_bank"] and cfg["key"]["seed"] == 0
    same_ids = [f.with_new("Klingon") for f in FACTS[:2]]
    with pytest.raises(StoreMismatchError, match="facts_hash"):
        evaluate(tiny_model, same_ids, method_kwargs={"ft": {"steps": 1}}, **kw)
    with pytest.raises(StoreMismatchError) as info:
        evaluate(tiny_model, FACTS[:2], method_kwargs={"ft": {"steps": 1, "lr": 0.5}}, **kw)
    assert info.value.fields == ["key.methods.ft.hparams.lr", "key.methods.ft.kwargs.lr"]
    with pytest.raises(StoreMismatchError):
        evaluate(tiny_model, FACTS[:2], method_kwargs={"ft": {"steps": 1, "preset": "ft-gpt2-xl"}}, **kw)
    # the same settings resume, and a smaller sample of the same facts reuses its rows
    df = evaluate(tiny_model, FACTS[:2], method_kwargs={"ft": {"steps": 1}}, n=1, **kw)
    assert df.loc[("ft", "entity", "subject"), ("n", "edits")] == 1
    assert (out / "details.jsonl").read_text().count("\n") == 4


def test_full_cube_and_locus_errors(tiny_model):
    assert cells_for(loci=None) == [("entity", "subject"), ("relation", "relation")]
    cube = cells_for(("entity", "relation"), ("subject", "relation", "relation_before_subject"))
    assert len(cube) == 6
    with pytest.raises(ValueError):
        cells_for(("entity",), ("object",))
    df = evaluate(tiny_model, FACTS[:2], methods=("rome",), loci=("relation_before_subject",), baseline=False,
                  progress=False, n_boot=20, method_kwargs={"rome": {"hparams": {"v_num_grad_steps": 2,
                                                                                 "mom2_adjustment": False,
                                                                                 "context_templates": ["{}"]}}})
    # a subject-first request has no relation token before the subject: the edit fails, and is counted
    assert df.loc[("rome", "entity", "relation_before_subject"), ("n", "failed")] == 2
    assert df.loc[("rome", "relation", "relation_before_subject"), ("n", "edits")] == 2


def test_relation_wide_edit_scores_high_bleed(tiny_model):
    """An edit that makes every subject of the relation answer o* (keyed where all subjects pass) is bleed."""
    L = tiny_model.cfg.n_layers

    def relation_wide(model, fact, locus="relation"):
        new_tok = object_token_ids(model, fact.target_new)[0]
        name = f"transformer.h.{L - 1}.mlp.c_proj.bias"
        return Edit(deltas={name: 50.0 * model.W_U[:, new_tok].detach()}, method="wide", locus=locus)

    df = evaluate(tiny_model, FACTS, methods=(relation_wide, _fake), requests=("relation",), progress=False,
                  n_boot=50)
    wide, base = df.loc[("relation_wide", "relation", "relation")], df.loc[(BASELINE, "relation", "-")]
    assert wide[("bleed", "bleed_acc")] == 100.0 and wide[("relation", "reliability_acc")] == 100.0
    assert base[("bleed", "bleed_acc")] < 50.0
    # it reaches the other phrasing family too, but no more for this subject than for the controls
    assert wide[("transfer", "reliability_acc")] == 100.0 and wide[("transfer", "generality_acc")] == 100.0
    assert wide[("transfer_adj", "reliability_acc")] == 0.0 and wide[("transfer_adj", "generality_acc")] == 0.0
    details = df.attrs["details"]
    assert (details["n_bleed"] > 0).all() and (details["n_controls"] > details["n_bleed"]).all()


def test_bleed_adjusted_transfer_and_other_relations_by_hand(monkeypatch):
    """The metrics re-derived by hand from which prompts answer o* (a stand-in for the model's scores)."""
    from workbench.evaluation import scoring
    from workbench.predict import ObjectScore

    fact = Fact(subject="Ann Kel", template="The mother tongue of {} is", target_true="French", target_new="Greek",
                relation_id="P103", entity_prompts=("Ann Kel's mother tongue is", "Ann Kel speaks"),
                relation_prompts=("The mother tongue of Ann Kel is", "The native language of Ann Kel is"), id=0)
    other = Fact(subject="Ann Kel", template="{} works for", target_true="Nokia", relation_id="P108",
                 entity_prompts=("Ann Kel works for",), relation_prompts=("The employer of Ann Kel is",), id=1)
    ps = probes(fact, [("Cy Dor", "German"), ("Ed Sul", "Dutch")], relations=[other])
    answers_new = {*ps.entity, *ps.relation, "The mother tongue of Cy Dor is", "The native language of Cy Dor is",
                   "Ed Sul speaks", "The employer of Ann Kel is"}

    def fake_scores(model, pairs, batch_size=64):
        return [ObjectScore(-0.1, True, 1.0) if (p in answers_new) == (o == "Greek") else ObjectScore(-5.0, False, 0.0)
                for p, o in pairs]

    monkeypatch.setattr(scoring, "score_objects", fake_scores)
    res = scoring.score_probes(None, fact, ps, "entity")
    for v in VARIANTS:
        assert res[f"relation_reliability_{v}"] == res[f"relation_generality_{v}"] == 1.0
        # relation family: Cy Dor moved in both phrasings, Ed Sul in neither: 1 - 1/2
        assert res[f"relation_adj_reliability_{v}"] == res[f"relation_adj_generality_{v}"] == 0.5
        # entity family: request phrasing no control moved (1 - 0), "X speaks": Ed Sul moved (1 - 1/2)
        assert res[f"entity_adj_reliability_{v}"] == 1.0 and res[f"entity_adj_generality_{v}"] == 0.5
        assert res[f"transfer_adj_generality_{v}"] == 0.5 and res[f"request_adj_generality_{v}"] == 0.5
        assert res[f"bleed_bleed_{v}"] == 0.25  # request phrasings x controls: one of four moved
        # the subject's other relation: its relation-first prompt now answers o*, its subject-first one kept Nokia
        assert res[f"other_relations_bleed_{v}"] == 0.5 and res[f"other_relations_locality_{v}"] == 0.5
    # a control-free family prompt is left out; no controls at all: NaN, not the raw transfer
    bare = scoring.score_probes(None, fact, probes(fact), "entity")
    assert math.isnan(bare["transfer_adj_reliability_acc"]) and bare["transfer_reliability_acc"] == 1.0
    assert math.isnan(bare["other_relations_bleed_acc"])


def test_kn_sees_only_the_request_prompt(tiny_model, monkeypatch):
    """KN's attribution receives the request prompt and nothing else: no probe of any family."""
    import importlib

    kn_module = importlib.import_module("workbench.editing.kn")

    seen: list[list[str]] = []
    real = kn_module.integrated_gradients

    def spy(model, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(kn_module, "integrated_gradients", spy)
    df = evaluate(tiny_model, FACTS, methods=("kn",), progress=False, baseline=False, n_boot=20,
                  method_kwargs={"kn": {"steps": 3}})
    assert len(seen) == 2 * len(FACTS)
    index = {f.subject: f for f in FACTS}
    for prompts, (_, row) in zip(seen, df.attrs["details"].iterrows()):
        assert prompts == [row["request_prompt"]]
        fact = index[row["subject"]]
        ps = probes(fact, [(s, o) for s, o, _ in SUBJECTS if s != fact.subject])
        other = ps.relation if row["request"] == "entity" else ps.entity
        probe_prompts = set(ps.entity[1:] + ps.relation[1:] + other + ps.locality + tuple(p for p, *_ in ps.bleed))
        assert not probe_prompts & set(prompts)


def test_failed_kn_calibration_is_recorded_as_failed(tiny_model):
    from workbench.editing.kn import KNCalibrationError, kn

    with pytest.raises(KNCalibrationError):
        kn(tiny_model, FACTS[0], preset="kn-calibrated", steps=3, lam_grid=(1e-6,))
    before = model_fingerprint(tiny_model)
    df = evaluate(tiny_model, FACTS, methods=("kn",), requests=("relation",), progress=False, n_boot=20,
                  method_kwargs={"kn": {"preset": "kn-calibrated", "steps": 3, "lam_grid": (1e-6,)}})
    assert model_fingerprint(tiny_model) == before
    cell = df.loc[("kn", "relation", "relation")]
    assert cell[("n", "failed")] == len(FACTS) and cell[("n", "edits")] == 0
    rows = df.attrs["details"]
    kn_rows = rows[rows["method"] == "kn"]
    assert kn_rows["failed"].all() and kn_rows["error"].str.startswith("KNCalibrationError").all()
    assert (kn_rows["preset"] == "kn-calibrated+custom").all()  # the preset with changed fields
    t1 = paper_table(df, "relation")
    assert t1.loc["KN", "failed"] == len(FACTS) and t1.loc["KN", "n"] == 0


def test_evaluate_one_is_pure_and_reverts(tiny_model):
    ph = phrasings(FACTS[1])
    ps = probes(FACTS[1], [("Varo Keltin", "French")], ph=ph)
    before = model_fingerprint(tiny_model)
    a = evaluate_one(tiny_model, FACTS[1], ("fake", _fake), "entity", None, ps, ph=ph)
    b = evaluate_one(tiny_model, FACTS[1], ("fake", _fake), "entity", None, ps, ph=ph)
    assert model_fingerprint(tiny_model) == before
    assert a["locus"] == "subject" and a["request"] == "entity" and not a["failed"]
    same = lambda row: {k: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731 - NaN != NaN
                        for k, v in row.items() if k not in ("seconds", "edit_s")}
    assert same(a) == same(b)


def test_registry_and_paper_order(monkeypatch):
    assert default_methods()[:2] == ("ft", "kn") and default_methods().index("rome") < default_methods().index("memit")
    # the real "mend" entry (and its label) come back after the test, for the tests that run after it
    monkeypatch.setitem(METHODS, "mend", METHODS.get("mend"))
    monkeypatch.setitem(METHOD_LABELS, "mend", METHOD_LABELS.get("mend"))
    register_method("mend", _fake, label="MEND")
    order = default_methods()
    assert order.index("kn") < order.index("mend") < order.index("rome")


# ------------------------------------------------------------------ intervals and tables
def test_bootstrap_interval_covers_known_mean():
    """95% percentile-bootstrap intervals of synthetic Bernoulli tables cover the true mean ~95% of the time."""
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(200):
        sample = (rng.random(100) < 0.3).astype(float)
        mean, lo, hi = bootstrap_ci(sample, n_boot=400, seed=i)
        assert lo <= mean <= hi and mean == pytest.approx(sample.mean())
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / 200 <= 0.99
    assert all(math.isnan(v) for v in bootstrap_ci([float("nan")]))
    # summarize() on a synthetic details table: exact means, intervals around them, n per cell
    details = pd.DataFrame({"method": "m", "request": "entity", "locus": "subject", "failed": False,
                            "entity_reliability_acc": (rng.random(300) < 0.7).astype(float)})
    s = summarize(details, n_boot=300)
    row = s.attrs["long"].query("family == 'entity' and measure == 'reliability' and variant == 'acc'").iloc[0]
    assert row["mean"] == pytest.approx(100 * details["entity_reliability_acc"].mean())
    assert row["lo"] < 70 < row["hi"] and row["n"] == 300


def test_tables(tiny_model, tmp_path):
    df = evaluate(tiny_model, FACTS[:3], methods=(_fake,), progress=False, n_boot=50)
    t1 = paper_table(df, "relation")
    assert [c for c in t1.columns if not c.endswith((" lo", " hi"))] == [
        "Entity Reliability", "Entity Generality", "Relation Reliability", "Relation Generality",
        "Entity Reliability, bleed-adj.", "Entity Generality, bleed-adj.", "Bleed", "Other-relation Bleed", "Locality",
        "Other-relation Locality", "n", "failed"]
    assert "Relation Generality, bleed-adj." in paper_table(df, "entity").columns  # the transfer family's
    assert "Entity Generality, bleed-adj." not in paper_table(df, "relation", adjusted=False).columns
    assert list(t1.index) == ["Unedited", "_fake"]
    assert t1.loc["_fake", "Entity Reliability"] == pytest.approx(
        df.loc[("_fake", "relation", "relation"), ("entity", "reliability_acc")])
    assert t1.loc["_fake", "Bleed lo"] <= t1.loc["_fake", "Bleed"] <= t1.loc["_fake", "Bleed hi"]
    t2 = paper_table(df, "entity", variant="score")
    assert t2.loc["_fake", "Locality"] == pytest.approx(
        df.loc[("_fake", "entity", "subject"), ("locality", "locality_score")])
    cube = cube_table(df)
    assert cube.shape[0] == 4 and cube.index.names == ["Method", "Request", "Locus"]
    md = to_markdown(t1, "caption")
    assert md.startswith("caption") and "| Method | Entity Reliability |" in md and " [" in md and "| 3 | 0 |" in md
    files = write_tables(df, tmp_path)
    names = {p.name for p in files}
    assert {"table1_relation_requests.csv", "table1_relation_requests.md", "table2_entity_requests_score.md",
            "table2_entity_requests_tok.csv", "cube.md", "cube.csv", "summary_long.csv"} <= names
    csv = pd.read_csv(tmp_path / "table1_relation_requests.csv")
    assert {"Bleed lo", "Bleed hi", "n", "failed"} <= set(csv.columns)
    with pytest.raises(ValueError):
        paper_table(df, "relation", variant="f1")


def test_select_facts():
    many = [_fact(i, f"Name{i} Kel", "French", "Polish") for i in range(10)]
    many.append(many[0].with_new(None))
    assert len(select_facts(many)) == 10
    pick = select_facts(many, 4, seed=1)
    assert len(pick) == 4 and pick == select_facts(many, 4, seed=1)


def test_reproduce_cli_parser():
    from workbench.cli import build_parser

    args = build_parser().parse_args(["reproduce", "--model", "toy-facts", "--facts", "toy-facts", "--out", "x",
                                      "-n", "5", "--methods", "ft,kn", "--loci", "subject,relation_before_subject",
                                      "--kn-preset", "kn-calibrated"])
    assert args.out == "x" and args.n == 5 and args.methods == "ft,kn" and callable(args.func)
    assert args.requests == "entity,relation" and args.kn_preset == "kn-calibrated"


# ------------------------------------------------------------------ bundled model
@needs_bundled
def test_bundled_methods_raise_request_reliability(toy_model):
    """Each method makes its own request prompt predict o* far more often than the unedited model (the original
    KN's fixed arithmetic, -2 E[top] + E[o*], rarely does on the bundled model: 17 % / 8 % of 12 facts)."""
    facts = load_facts("toy-facts")
    before = model_fingerprint(toy_model)
    df = evaluate(toy_model, facts, methods=("ft", "kn", "kn-subject", "rome", "memit"), n=3, progress=False,
                  check_every=1, raise_errors=True, n_boot=20, strict_presets=True)
    assert model_fingerprint(toy_model) == before  # every edit reverted
    for request, locus in (("entity", "subject"), ("relation", "relation")):
        assert df.loc[(BASELINE, request, "-"), ("request", "reliability_acc")] <= 25
        for method in ("ft", "rome", "memit"):
            assert df.loc[(method, request, locus), ("request", "reliability_acc")] >= 60, (method, request)
    assert df.loc[("kn-subject", "relation", "relation"), ("request", "reliability_acc")] >= 30
    details = df.attrs["details"]
    kn_rows = details[details["method"] == "kn"]
    assert (kn_rows["info_n_neurons"] >= 1).all() and not kn_rows["failed"].any()
    assert set(details["preset"]) >= {"ft-toy", "kn-original", "kn-subject", "rome:toy-facts", "memit:toy-facts"}
    assert set(details["model_identity"]) == {"toy-facts"}
    assert {"KN", "KN (subject locus)"} <= set(paper_table(df, "entity").index)  # the ablation is its own row


@needs_bundled
def test_bundled_bleed_adjusted_transfer_separates_subject_and_relation_keys(toy_model):
    """ROME keyed at the subject transfers as specific knowledge (adjusted = raw); keyed at the relation's
    last token much of its transfer is a rewrite of the phrasing (the controls answer o* too)."""
    facts = load_facts("toy-facts")
    df = evaluate(toy_model, facts, methods=("rome",), n=6, progress=False, raise_errors=True, n_boot=20)
    details = df.attrs["details"]
    assert (details["n_other_relations"] == 14).all() and (details["n_controls"] == 5 * 6).all()
    ent, rel = df.loc[("rome", "entity", "subject")], df.loc[("rome", "relation", "relation")]
    assert ent[("transfer", "generality_acc")] >= 80
    assert ent[("transfer_adj", "generality_acc")] >= ent[("transfer", "generality_acc")] - 5
    assert rel[("bleed", "bleed_acc")] >= 20
    assert rel[("transfer_adj", "generality_acc")] <= rel[("transfer", "generality_acc")] - 15
    # the model knows the subject's other facts; the edit does not make them answer o*
    assert df.loc[(BASELINE, "entity", "-"), ("other_relations", "locality_acc")] == 100.0
    assert ent[("other_relations", "bleed_acc")] <= 10


def test_evaluation_key_holds_the_corpus_by_content(tiny_model, tmp_path):
    """Issue 21: the key recorded the path of --corpus, so replacing the file in place reused old rows."""
    from workbench.evaluation.run import evaluation_key, resolve_method

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Varo Keltin was born in Osla.\n")
    kwargs = {m: {"hparams": {"mom2_dataset": str(corpus)}} for m in ("rome", "memit")}
    resolved = [resolve_method(m) for m in ("rome", "memit")]
    before = evaluation_key(tiny_model, FACTS, resolved, kwargs, seed=0)
    corpus.write_text("Mira Dos speaks German.\n")
    after = evaluation_key(tiny_model, FACTS, resolved, kwargs, seed=0)
    assert before["methods"]["rome"]["corpus"] != after["methods"]["rome"]["corpus"]
    assert before["methods"]["memit"]["corpus"] != after["methods"]["memit"]["corpus"]
