"""Probe families, teacher-forced metrics, evaluate() with resume, and the paper's tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from workbench.evaluation import (BASELINE, METRIC_COLUMNS, evaluate, full_table, paper_table, probes,
                                  relation_templates, score_fact, score_objects, select_facts, to_markdown,
                                  write_tables)
from workbench.facts import Fact, load_facts
from workbench.loading import model_fingerprint
from workbench.predict import object_token_ids
from workbench.spans import tokenize

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "toy-facts" / "model.safetensors"
needs_bundled = pytest.mark.skipif(not BUNDLED.exists(), reason="bundled model not built")

CF_IDS = ("P17 P19 P20 P27 P30 P36 P37 P39 P101 P103 P106 P108 P127 P131 P136 P138 P140 P159 P176 P178 P190 "
          "P264 P276 P407 P413 P449 P463 P495 P530 P740 P937 P1303 P1412").split()


def _fact(i: int, subject: str, new: str, **kw) -> Fact:
    base = dict(subject=subject, template="The mother tongue of {} is", target_true="French", target_new=new,
                relation_id="P103", paraphrases=(f"{subject} speaks",), neighborhood=("Miles Davis speaks",
                                                                                     "Toko Yasuda speaks"),
                neighborhood_targets=("English", "Japanese"), id=i)
    base.update(kw)
    return Fact(**base)


FACTS = [_fact(0, "Varo Keltin", "Tuvan"), _fact(1, "Mira Dos", "German"), _fact(2, "Toko Yasuda", "Polish")]


# ------------------------------------------------------------------ probes
def test_template_bank_covers_counterfact():
    bank = relation_templates()
    assert set(CF_IDS) <= set(bank)
    for rid in CF_IDS:
        ts = bank[rid]
        assert 2 <= len(ts) <= 4
        assert all(t.count("{}") == 1 and not t.startswith("{}") for t in ts)
    assert relation_templates("P999") == ()


def test_probes_counterfact():
    p = probes(FACTS[0])
    assert p.entity == ("The mother tongue of Varo Keltin is", "Varo Keltin speaks")
    # bank templates, minus the one equal to the rewrite prompt
    assert p.relation == ("The native language of Varo Keltin is", "The first language of Varo Keltin is")
    assert p.locality_targets == ("English", "Japanese")
    cf = load_facts(Path(__file__).parent / "fixtures" / "counterfact_small.json")[0]
    assert probes(cf).locality_targets == (cf.target_true,) * len(cf.neighborhood)


def test_probes_bundled_world_puts_edit_prompt_first():
    f = Fact(subject="Ann Kel", template="{} speaks", target_true="French", target_new="Greek", relation_id="P103",
             entity_prompts=("Ann Kel's mother tongue is", "Ann Kel speaks"),
             relation_prompts=("The native language of Ann Kel is", "The mother tongue of Ann Kel is"))
    p = probes(f)
    assert p.entity == ("Ann Kel speaks", "Ann Kel's mother tongue is")
    assert p.relation == f.relation_prompts  # the edit prompt is subject-first: relation order unchanged


# ------------------------------------------------------------------ scoring
def _direct(model, prompt: str, obj: str) -> tuple[float, bool]:
    ids = list(tokenize(model, prompt).ids)
    o = object_token_ids(model, obj)
    logits = model(torch.tensor([ids + o]), return_type="logits")[0]
    lp = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(o)].float(), -1)
    return float(lp[torch.arange(len(o)), torch.tensor(o)].mean()), bool((lp.argmax(-1) == torch.tensor(o)).all())


def test_score_objects_matches_direct(tiny_model):
    pairs = [("The mother tongue of Varo Keltin is", "Tuvan"), ("The mother tongue of Varo Keltin is", "French"),
             ("Miles Davis speaks", "the trumpet and French"), ("Toko Yasuda speaks", "Japanese")]
    assert len(object_token_ids(tiny_model, pairs[2][1])) > 2  # a multi-token object
    got = score_objects(tiny_model, pairs, batch_size=3)
    for (p, o), s in zip(pairs, got):
        lp, ok = _direct(tiny_model, p, o)
        assert s.mean_logprob == pytest.approx(lp, abs=1e-4) and s.correct == ok


def test_score_fact_keys_and_range(tiny_model):
    res = score_fact(tiny_model, FACTS[0])
    assert set(res) == {f"{f}_{m}" for f, m in METRIC_COLUMNS}
    assert all(math.isnan(v) or 0 <= v <= 1 for v in res.values())
    same = _fact(5, "Varo Keltin", "English")  # a neighbour's answer equals o*: left out of the score
    res = score_fact(tiny_model, same)
    assert res["locality_locality_score"] in (0.0, 1.0)
    with pytest.raises(ValueError):
        score_fact(tiny_model, Fact(subject="A B", template="{} speaks", target_true="French"))


# ------------------------------------------------------------------ evaluate
def _fake_method(model, fact, locus="subject"):
    """A deterministic stand-in edit (fast): nudges one W_out row."""
    from workbench.editing import Edit
    from workbench.loading import hf_parameter

    name = "transformer.h.1.mlp.c_proj.weight"
    d = torch.zeros_like(hf_parameter(model, name))
    d[int(fact.id) % d.shape[0]] = 0.5 if locus == "subject" else -0.5
    return Edit(deltas={name: d}, method="fake", locus=locus)


def _failing(model, fact, locus="subject"):
    raise ValueError("cannot edit this")


def test_evaluate_shape_baseline_resume(tiny_model, tmp_path):
    before = model_fingerprint(tiny_model)
    out = tmp_path / "run"
    df = evaluate(tiny_model, FACTS, methods=(_fake_method, "ft", _failing), out=out, progress=False, check_every=1,
                  method_kwargs={"ft": {"steps": 2}})
    assert model_fingerprint(tiny_model) == before
    assert list(df.index) == [(BASELINE, "-"), ("_fake_method", "subject"), ("_fake_method", "relation"),
                              ("ft", "subject"), ("ft", "relation"), ("_failing", "subject"), ("_failing", "relation")]
    assert list(df.columns)[:len(METRIC_COLUMNS)] == list(METRIC_COLUMNS)
    assert df[("n", "edits")].tolist() == [3, 3, 3, 3, 3, 0, 0]
    assert df.loc[("_failing", "subject"), ("n", "errors")] == 3
    # the baseline row is the unedited model's scores
    direct = pd.DataFrame([score_fact(tiny_model, f) for f in FACTS]).mean() * 100
    for fam, met in METRIC_COLUMNS:
        a, b = df.loc[(BASELINE, "-"), (fam, met)], direct[f"{fam}_{met}"]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)
    details = df.attrs["details"]
    assert len(details) == 7 * 3
    lines = (out / "details.jsonl").read_text().splitlines()
    assert len(lines) == 21 and (out / "summary.csv").exists()
    # resume: a cut-off last line and one missing row are redone, nothing else
    (out / "details.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    calls = []

    def counting(model, fact, locus="subject"):
        calls.append(fact.id)
        raise ValueError("cannot edit this")
    counting.__name__ = "_failing"
    again = evaluate(tiny_model, FACTS, methods=(_fake_method, "ft", counting), out=out, progress=False,
                     method_kwargs={"ft": {"steps": 2}})
    assert calls == [FACTS[-1].id]
    pd.testing.assert_frame_equal(again, df)


def test_evaluate_refuses_other_model_folder(tiny_model, tmp_path):
    out = tmp_path / "run"
    evaluate(tiny_model, FACTS[:1], methods=(), out=out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["key"]["model_fingerprint"] = "0" * 16
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="model_fingerprint"):
        evaluate(tiny_model, FACTS[:1], methods=(), out=out, progress=False)


def test_evaluate_refuses_other_facts_kwargs_or_hparams_in_one_folder(tiny_model, tmp_path):
    """Problem 1: rows keyed by (method, locus, fact id) alone were reused across facts files and kwargs."""
    from workbench.store import StoreMismatchError

    out = tmp_path / "run"
    evaluate(tiny_model, FACTS[:2], methods=("ft",), loci=("subject",), out=out, progress=False,
             method_kwargs={"ft": {"steps": 1}})
    same_ids = [f.with_new("Klingon") for f in FACTS[:2]]
    with pytest.raises(StoreMismatchError, match="facts_hash") as info:
        evaluate(tiny_model, same_ids, methods=("ft",), loci=("subject",), out=out, progress=False,
                 method_kwargs={"ft": {"steps": 1}})
    assert "another --out" in str(info.value)
    with pytest.raises(StoreMismatchError) as info:
        evaluate(tiny_model, FACTS[:2], methods=("ft",), loci=("subject",), out=out, progress=False,
                 method_kwargs={"ft": {"steps": 1, "lr": 0.5}})
    assert info.value.fields == ["key.methods.ft.hparams.lr", "key.methods.ft.kwargs.lr"]
    # the same settings resume, and a smaller sample of the same facts reuses its rows
    df = evaluate(tiny_model, FACTS[:2], methods=("ft",), loci=("subject",), out=out, progress=False, n=1,
                  method_kwargs={"ft": {"steps": 1}})
    assert df.loc[("ft", "subject"), ("n", "edits")] == 1
    assert (out / "details.jsonl").read_text().count("\n") == 4


def test_select_facts():
    many = [_fact(i, f"Name{i} Kel", "Tuvan") for i in range(10)] + [_fact(99, "No New", "x").with_new(None)]
    assert len(select_facts(many)) == 10
    pick = select_facts(many, 4, seed=1)
    assert len(pick) == 4 and pick == select_facts(many, 4, seed=1)
    assert [f.id for f in pick] == sorted(f.id for f in pick)


def test_tables(tiny_model, tmp_path):
    df = evaluate(tiny_model, FACTS[:2], methods=(_fake_method,), progress=False)
    t1 = paper_table(df, "relation")
    assert list(t1.columns) == ["Entity Reliability", "Entity Generality", "Relation Reliability",
                                "Relation Generality", "Locality", "n"]
    assert list(t1.index) == ["Unedited", "_fake_method"]
    assert t1.loc["_fake_method", "Entity Reliability"] == df.loc[("_fake_method", "relation"),
                                                                  ("entity", "reliability_acc")]
    t2 = paper_table(df, "subject", metric="score")
    assert t2.loc["_fake_method", "Locality"] == df.loc[("_fake_method", "subject"), ("locality", "locality_score")]
    full = full_table(df)
    assert full.shape == (3, 6) and full.index.names == ["Method", "Edit locus"]
    md = to_markdown(t1, "caption")
    assert md.startswith("caption") and "| Method | Entity Reliability |" in md and "| 2 |" in md
    files = write_tables(df, tmp_path)
    assert {p.name for p in files} >= {"table1_relation_edits.csv", "table1_relation_edits.md",
                                      "table2_entity_edits.csv", "table2_entity_edits.md", "table_2x2.md"}
    with pytest.raises(ValueError):
        paper_table(df, "relation", metric="f1")


def test_reproduce_cli_parser():
    from workbench.cli import build_parser

    args = build_parser().parse_args(["reproduce", "--model", "toy-facts", "--facts", "toy-facts", "--out", "x",
                                      "-n", "5", "--methods", "ft,kn"])
    assert args.out == "x" and args.n == 5 and args.methods == "ft,kn" and callable(args.func)


# ------------------------------------------------------------------ bundled model
def _edit_prompt_reliability(details: pd.DataFrame, facts, method: str) -> float:
    """Accuracy (%) on the edit prompt itself: the first probe of the family it belongs to."""
    by_id = {str(f.id): f for f in facts}
    vals = []
    for _, r in details[details["method"] == method].iterrows():
        fact = by_id[str(r["fact_id"])]
        fam = "entity" if probes(fact).entity[0] == fact.prompt else "relation"
        vals.append(r[f"{fam}_reliability_acc"])
    return 100 * sum(vals) / len(vals)


@needs_bundled
def test_bundled_methods_raise_reliability(toy_model):
    """Each method moves reliability of its edited prompts far above the unedited model.

    FT, ROME and MEMIT at the subject locus; KN at the relation locus (at the subject locus
    it reaches only ~50% on this model, see the 100-edit table in the docs).
    """
    facts = load_facts("toy-facts")
    before = model_fingerprint(toy_model)
    df = evaluate(toy_model, facts, methods=("ft", "rome", "memit"), loci=("subject",), n=4, progress=False,
                  check_every=1, raise_errors=True)
    kn_df = evaluate(toy_model, facts, methods=("kn",), loci=("relation",), n=4, progress=False, baseline=False,
                     check_every=1, raise_errors=True)
    assert model_fingerprint(toy_model) == before  # every edit reverted
    assert df.shape == (4, len(METRIC_COLUMNS) + 2)
    chosen = select_facts(facts, 4)
    direct = pd.DataFrame([score_fact(toy_model, f) for f in chosen]).mean() * 100
    for fam, met in METRIC_COLUMNS:
        assert df.loc[(BASELINE, "-"), (fam, met)] == pytest.approx(direct[f"{fam}_{met}"])
    base = max(direct["entity_reliability_acc"], direct["relation_reliability_acc"])
    assert base <= 25
    for method in ("ft", "rome", "memit"):
        assert _edit_prompt_reliability(df.attrs["details"], chosen, method) >= 75, method
    assert _edit_prompt_reliability(kn_df.attrs["details"], chosen, "kn") >= 75


@needs_bundled
def test_bundled_revert_bit_identical(toy_model):
    from workbench.editing.edit import named_parameters
    from workbench.evaluation import make_edit, resolve_method

    fact = select_facts(load_facts("toy-facts"), 1, seed=5)[0]
    params = named_parameters(toy_model)
    for method in ("ft", "kn", "rome", "memit"):
        name, fn = resolve_method(method)
        edit = make_edit(name, fn, toy_model, fact, "subject", {"steps": 4} if method == "kn" else None)
        saved = {n: params[n].detach().clone() for n in edit.deltas}
        edit.apply(toy_model)
        assert any(not torch.equal(params[n], saved[n]) for n in saved), method
        edit.revert(toy_model)
        assert all(torch.equal(params[n], saved[n]) for n in saved), method
