"""Causal tracing: exactness of the noise, of the engines against each other, spans, buckets, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.loading import assets_dir, hf_model, random_model
from workbench.spans import tokenize
from workbench.tracing import (BUCKETS, SeveredResult, TraceResult, bucket_positions, draw_noise, noise_level,
                               severed_trace, trace, trace_dataset)
from workbench.tracing.dataset import aggregate
from workbench.tracing.noise import Corruption

PROMPT, SUBJECT = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"
TOL = 1e-6


@pytest.fixture(scope="module")
def peaky():
    """A 3-layer random GPT-2 with weights scaled up, so that corruption and restoration matter."""
    model = random_model(3, 64, 4, seed=1, device="cpu")
    with torch.no_grad():
        for p in hf_model(model).parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    return model


# ------------------------------------------------------------------ noise

def test_noise_draw_is_numpy_randomstate():
    eps = draw_noise(4, 3, 8, 0.7, seed=5)
    assert np.array_equal(eps, np.random.RandomState(5).randn(4, 3, 8) * 0.7)
    uni = draw_noise(2, 2, 4, 0.5, seed=1, uniform=True)
    assert np.array_equal(uni, np.random.RandomState(1).uniform(-1, 1, (2, 2, 4)) * 0.5)


def test_noise_added_in_float64_like_rome():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    eps = draw_noise(3, 2, 8, 0.3, seed=1)
    ref = x.clone()
    ref[:, 1:3] += torch.from_numpy(eps)  # what ROME's ``x[1:, b:e] += noise`` computes
    got = Corruption((1, 2), eps).apply(x.clone(), torch.arange(3))
    assert torch.equal(got, ref)
    rep = Corruption((1, 2), eps, replace=True).apply(x.clone(), torch.tensor([2, 0, 1]))
    assert torch.equal(rep[0, 1:3], torch.from_numpy(eps[2]).float())
    assert torch.equal(rep[:, [0, 3, 4]], x[:, [0, 3, 4]])


def test_s3_rule_by_hand(tiny_model):
    wte = hf_model(tiny_model).transformer.wte.weight
    rows = []
    for s in ["Danielle Darrieux", "Paris", "Miles Davis"]:
        ids = tiny_model.tokenizer(s, add_special_tokens=False)["input_ids"]
        rows.append(wte[ids])
    expected = 3 * torch.cat(rows).std().item()
    assert noise_level(tiny_model, ["Danielle Darrieux", "Paris", "Miles Davis"]) == pytest.approx(expected, rel=1e-6)
    assert noise_level(tiny_model, ["Paris"], "s2") == pytest.approx(2 / 3 * noise_level(tiny_model, "Paris"), rel=1e-6)
    assert noise_level(tiny_model, ["Paris"], 0.25) == 0.25
    assert noise_level(tiny_model, ["Paris"], "u0.5") == 0.5
    res = trace(tiny_model, PROMPT, subject=SUBJECT, kinds=(), samples=2)
    assert res.noise_level == pytest.approx(noise_level(tiny_model, [SUBJECT]), rel=1e-9)
    with pytest.raises(ValueError, match="noise"):
        trace(tiny_model, PROMPT, subject=SUBJECT, kinds=(), noise="x1")


# ------------------------------------------------------------------ spans

def test_relation_span_and_subject_span(tiny_model):
    res = trace(tiny_model, PROMPT, subject=SUBJECT, corrupt="relation", kinds=(), samples=2)
    toks = tokenize(tiny_model, PROMPT)
    subj = res.subject_span
    assert "".join(toks.str_tokens[p] for p in subj) == " " + SUBJECT
    assert res.relation_span == res.corrupted_span
    rel_text = [toks.str_tokens[p] for p in res.relation_span]
    assert "".join(rel_text) == "The mother tongue of is"
    assert not res.relation_span.contiguous
    assert res.relation_span.last == len(toks) - 1
    assert set(res.relation_span) | set(subj) == set(range(1, len(toks)))
    sub = trace(tiny_model, PROMPT, subject=SUBJECT, corrupt="tongue", kinds=(), samples=2)
    assert "".join(toks.str_tokens[p] for p in sub.corrupted_span).strip() == "tongue"
    rng = trace(tiny_model, PROMPT, corrupt=(1, 3), kinds=(), samples=2, noise=0.1)
    assert tuple(rng.corrupted_span) == (1, 2) and rng.subject_span is None


# ------------------------------------------------------------------ exactness of the engines

@pytest.mark.parametrize("engine", ["incremental", "batched"])
def test_last_layer_last_token_is_clean_and_prefix_changes_nothing(peaky, engine):
    res = trace(peaky, PROMPT, subject=SUBJECT, samples=3, engine=engine, window=2)
    assert res.p_clean > res.p_corrupt + 1e-3  # the corruption matters on this model
    h = res.scores["hidden"]
    if engine == "incremental":
        assert h[-1, -1] == np.float32(res.p_clean)
    assert abs(h[-1, -1] - res.p_clean) < TOL
    before = res.corrupted_span.start
    for kind in res.kinds:
        assert np.abs(res.scores[kind][:before] - res.p_corrupt).max() < TOL


def test_batched_equals_one_forward_per_cell(peaky):
    """The batched engine against the original algorithm (one forward pass of S+1 rows per cell).

    Cells: a token before the corrupted span, the first corrupted token and the last token,
    every layer (window 3 on 3 layers clips at both edges), all three kinds.
    """
    from workbench.tracing.api import prepare
    from workbench.tracing.engine import Plan, kind_plan

    kw = dict(subject=SUBJECT, samples=3)
    loop = prepare(peaky, PROMPT, engine="loop", **kw)
    batched = prepare(peaky, PROMPT, engine="batched", max_batch=7, **kw)
    first, n = loop.corrupted_span.first, len(loop.tokens)
    plan = Plan.concat([kind_plan(k, [first - 1, first, n - 1], 3, 3) for k in ("hidden", "mlp", "attn")])
    answer = loop.resolve_answer(peaky, None)
    assert answer == batched.resolve_answer(peaky, None)
    ref, got = loop.engine.run(plan, answer), batched.engine.run(plan, answer)
    assert loop.engine.p_corrupt(answer) == pytest.approx(batched.engine.p_corrupt(answer), abs=TOL)
    assert np.abs(ref - got).max() < TOL
    assert np.ptp(ref) > 1e-3  # not a vacuous comparison


@pytest.mark.parametrize("window,corrupt,noise,replace,max_batch", [
    (1, "subject", "s3", False, None),
    (2, "relation", "s3", False, 5),
    (3, "subject", "u0.4", False, 13),  # the whole depth (a larger window is refused)
    (3, "subject", 0.5, True, None),
])
def test_incremental_equals_batched(peaky, window, corrupt, noise, replace, max_batch):
    kw = dict(subject=SUBJECT, samples=3, window=window, corrupt=corrupt, noise=noise, replace=replace)
    inc = trace(peaky, PROMPT, engine="incremental", max_batch=max_batch, **kw)
    ref = trace(peaky, PROMPT, engine="batched", **kw)
    assert inc.answer_id == ref.answer_id
    assert inc.p_clean == pytest.approx(ref.p_clean, abs=TOL)
    assert inc.p_corrupt == pytest.approx(ref.p_corrupt, abs=TOL)
    for kind in inc.kinds:
        assert np.abs(inc.scores[kind] - ref.scores[kind]).max() < TOL, kind


def test_same_draw_for_every_cell_and_seed(peaky):
    a = trace(peaky, PROMPT, subject=SUBJECT, samples=2, kinds=("hidden",), seed=3)
    b = trace(peaky, PROMPT, subject=SUBJECT, samples=2, kinds=("hidden",), seed=3)
    c = trace(peaky, PROMPT, subject=SUBJECT, samples=2, kinds=("hidden",), seed=4)
    assert np.array_equal(a.scores["hidden"], b.scores["hidden"])
    assert not np.array_equal(a.scores["hidden"], c.scores["hidden"])


def test_fast_precision_on_cpu_is_exact_and_bf16_is_close(peaky):
    exact = trace(peaky, PROMPT, subject=SUBJECT, samples=2, kinds=("hidden",))
    fast = trace(peaky, PROMPT, subject=SUBJECT, samples=2, kinds=("hidden",), precision="fast")
    assert np.array_equal(exact.scores["hidden"], fast.scores["hidden"])
    bf16 = trace(peaky, PROMPT, subject=SUBJECT, samples=2, kinds=("hidden",), precision="bf16")
    assert np.abs(bf16.scores["hidden"] - exact.scores["hidden"]).max() < 0.05


def test_out_of_memory_halves_the_chunk():
    from workbench.tracing.engine import run_chunked

    sizes = []

    def fn(a, b):
        sizes.append(b - a)
        if b - a > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.arange(a, b)

    assert run_chunked(10, 16, fn).tolist() == list(range(10))
    assert sizes[:3] == [10, 5, 2] and max(sizes[3:]) <= 3

    def broken(a, b):
        raise RuntimeError("some other error")

    with pytest.raises(RuntimeError, match="other"):
        run_chunked(4, 4, broken)


# ------------------------------------------------------------------ severed tracing

def test_severed_nothing_severed_equals_hidden(peaky):
    hidden = trace(peaky, PROMPT, subject=SUBJECT, samples=3, kinds=("hidden",))
    for engine in ("incremental", "batched"):
        sev = severed_trace(peaky, PROMPT, subject=SUBJECT, samples=3, engine=engine)
        t = hidden.subject_span.last
        assert sev.token == t
        assert np.abs(sev.none - hidden.scores["hidden"][t]).max() < TOL
        assert sev.p_corrupt == pytest.approx(hidden.p_corrupt, abs=TOL)
        assert np.abs(sev.mlp_severed - sev.none).max() > 10 * TOL  # severing does something
        if engine == "incremental":
            inc = sev
        else:
            for name in ("mlp_severed", "attn_severed"):
                assert np.abs(getattr(inc, name) - getattr(sev, name)).max() < TOL
    # restoring the last layer: nothing downstream to sever
    assert inc.mlp_severed[-1] == pytest.approx(inc.none[-1], abs=TOL)
    assert SeveredResult.from_dict(json.loads(json.dumps(inc.to_dict()))).mlp_severed.tolist() == \
        inc.mlp_severed.tolist()


# ------------------------------------------------------------------ results

def test_trace_result_json_roundtrip(tiny_model, tmp_path):
    res = trace(tiny_model, PROMPT, subject=SUBJECT, samples=2, kinds=("hidden", "attn"))
    path = res.save_json(tmp_path / "t.json")
    back = TraceResult.load_json(path)
    assert back.tokens == res.tokens and back.corrupted_span == res.corrupted_span
    assert np.array_equal(back.scores["attn"], res.scores["attn"])
    assert back.ie("hidden").shape == (len(res.tokens), tiny_model.cfg.n_layers)
    assert back.p_corrupt == res.p_corrupt and back.kinds == res.kinds


# ------------------------------------------------------------------ buckets

def test_buckets_by_hand():
    b = bucket_positions([3, 4, 5, 6], 10)
    assert b == {"first corrupted": [3], "middle corrupted": [4, 5], "last corrupted": [6],
                 "first after": [7], "further": [8], "last token": [9]}
    one = bucket_positions([2], 4)  # one-token subject right before the last token
    assert one == {"first corrupted": [2], "middle corrupted": [], "last corrupted": [2],
                   "first after": [3], "further": [], "last token": [3]}
    rel = bucket_positions([1, 2, 3, 4, 7], 8)  # "The mother tongue of {} is": subject at 5, 6
    assert rel == {"first corrupted": [1], "middle corrupted": [2, 3, 4], "last corrupted": [7],
                   "first after": [], "further": [], "last token": [7]}


def test_aggregate_by_hand():
    L = 2
    s1 = np.arange(14, dtype=float).reshape(7, L)  # 7 tokens, subject [1, 4)
    s2 = np.ones((4, L))  # 4 tokens, subject [1, 2)
    recs = [
        {"kept": True, "corrupted_span": [1, 2, 3], "n_tokens": 7, "p_corrupt": 1.0, "scores": {"hidden": s1}},
        {"kept": True, "corrupted_span": [1], "n_tokens": 4, "p_corrupt": 0.5, "scores": {"hidden": s2}},
        {"kept": False, "corrupted_span": [1], "n_tokens": 4, "p_corrupt": None, "scores": None},
    ]
    aie, counts = aggregate(recs, ("hidden",), L)
    df = aie["hidden"]
    assert list(df.index) == list(BUCKETS) and list(df.columns) == [0, 1]
    assert counts.tolist() == [2, 1, 2, 2, 1, 2]
    ie1 = s1 - 1.0
    assert df.loc["first corrupted"].tolist() == pytest.approx(((ie1[1] + 0.5) / 2).tolist())
    assert df.loc["middle corrupted"].tolist() == pytest.approx(ie1[2].tolist())
    assert df.loc["last corrupted"].tolist() == pytest.approx(((ie1[3] + 0.5) / 2).tolist())
    assert df.loc["first after"].tolist() == pytest.approx(((ie1[4] + 0.5) / 2).tolist())
    assert df.loc["further"].tolist() == pytest.approx(ie1[5].tolist())
    assert df.loc["last token"].tolist() == pytest.approx(((ie1[6] + 0.5) / 2).tolist())


# ------------------------------------------------------------------ datasets

def _facts(model, monkeypatch):
    """Facts whose expected objects are the model's own top-1 tokens (``<id:N>``), one of them wrong."""
    import workbench.tracing.dataset as ds
    from workbench.facts import Fact
    from workbench.predict import next_token_probs, object_token_ids

    # The fallback tokenizer of random models splits the leading space off every word, so
    # expected objects name token ids directly here.
    monkeypatch.setattr(ds, "object_token_ids", lambda m, obj: [int(obj[4:-1])] if obj.startswith("<id:")
                        else object_token_ids(m, obj))
    templates = ["The mother tongue of {} is", "{} plays the", "The capital of {} is", "{} was born in"]
    subjects = ["Danielle Darrieux", "Miles Davis", "France", "Varo Keltin"]
    facts = []
    for i, (tpl, subj) in enumerate(zip(templates, subjects)):
        top = int(next_token_probs(model, [tpl.format(subj)])[0].argmax())
        target = f"<id:{top + 1 if i == 2 else top}>"  # fact 2 expects another token: skipped
        facts.append(Fact(subject=subj, template=tpl, target_true=target, id=100 + i))
    return facts


def test_trace_dataset_resume_equals_uninterrupted(peaky, tmp_path, monkeypatch):
    import workbench.tracing.dataset as ds

    facts = _facts(peaky, monkeypatch)
    kw = dict(kinds=("hidden", "mlp"), samples=2, window=2, progress=False)
    full = trace_dataset(peaky, facts, out=tmp_path / "a", **kw)
    assert full.n_facts == 4 and full.n_skipped == 1
    assert list(full.aie["hidden"].index) == list(BUCKETS)
    assert int(full.counts["last token"]) == 4 - full.n_skipped
    assert full.per_fact["kept"].sum() == 4 - full.n_skipped

    class Crash(Exception):
        pass

    real, calls = ds._trace_fact, []

    def crashing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise Crash  # stands for a kill or Ctrl-C in the middle of fact 2
        return real(*args, **kwargs)

    monkeypatch.setattr(ds, "_trace_fact", crashing)
    with pytest.raises(Crash):
        trace_dataset(peaky, facts, out=tmp_path / "b", **kw)
    with open(tmp_path / "b" / "facts.jsonl", "a") as fh:
        fh.write('{"index": 2, "id": 102, "prom')  # a line cut by the crash
    calls.clear()
    resumed = trace_dataset(peaky, facts, out=tmp_path / "b", **kw)
    assert calls == [2, 3]  # finished facts are not recomputed
    for kind in kw["kinds"]:
        assert np.array_equal(resumed.aie[kind].to_numpy(), full.aie[kind].to_numpy(), equal_nan=True)
    assert resumed.counts.tolist() == full.counts.tolist()
    assert resumed.p_corrupt == full.p_corrupt
    import pandas as pd

    lines = pd.read_json(tmp_path / "b" / "facts.jsonl", lines=True)
    assert sorted(lines["index"]) == [0, 1, 2, 3]
    monkeypatch.setattr(ds, "_trace_fact", real)
    mem = trace_dataset(peaky, facts, **kw)  # no out dir
    assert np.allclose(mem.aie["mlp"].to_numpy(), full.aie["mlp"].to_numpy(), equal_nan=True)
    with pytest.raises(ValueError, match="another"):
        trace_dataset(peaky, facts, out=tmp_path / "a", **{**kw, "samples": 3})


def test_trace_dataset_relation(peaky, monkeypatch):
    facts = _facts(peaky, monkeypatch)
    res = trace_dataset(peaky, facts, corrupt="relation", kinds=("hidden",), samples=2, progress=False)
    kept = res.per_fact[res.per_fact["kept"]]
    assert len(kept) == 4 - res.n_skipped
    for _, row in kept.iterrows():
        assert row["corrupted_span"] == row["relation_span"]
        assert row["scores_hidden"].shape == (row["n_tokens"], peaky.cfg.n_layers)


# ------------------------------------------------------------------ command line

def test_cli_trace_and_sweep(peaky, tmp_path, capsys, monkeypatch):
    from workbench.cli import main
    from workbench.loading import save_hf

    folder = save_hf(peaky, tmp_path / "model")
    out = tmp_path / "t.json"
    rc = main(["trace", "--model", str(folder), "--device", "cpu", "--prompt", PROMPT, "--subject", SUBJECT,
               "--samples", "2", "--kinds", "hidden", "mlp", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "p_clean" in text and "hidden" in text
    assert TraceResult.load_json(out).kinds == ("hidden", "mlp")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"known_id": f.id, "subject": f.subject, "attribute": f.target_true,
                                  "template": f.template, "prompt": f.prompt} for f in _facts(peaky, monkeypatch)]))
    rc = main(["sweep", "--model", str(folder), "--device", "cpu", "--facts", str(facts), "--corrupt", "subject",
               "--out", str(tmp_path / "sw"), "--samples", "2", "--kinds", "hidden", "--no-progress"])
    assert rc == 0
    assert "last token" in capsys.readouterr().out
    assert (tmp_path / "sw" / "config.json").exists()


# ------------------------------------------------------------------ bundled model

def test_bundled_model_engines_agree():
    if not (assets_dir() / "toy-facts" / "model.safetensors").exists():
        pytest.skip("bundled model assets/toy-facts/model.safetensors is absent")
    from workbench.facts import load_facts
    from workbench.loading import load_model

    model = load_model("toy-facts", device="cpu")
    fact = load_facts("toy-facts")[0]
    kw = dict(subject=fact.subject, template=fact.template, samples=3, kinds=("hidden", "mlp", "attn"))
    inc = trace(model, fact.prompt, **kw)
    ref = trace(model, fact.prompt, engine="batched", **kw)
    for kind in inc.kinds:
        assert np.abs(inc.scores[kind] - ref.scores[kind]).max() < TOL
    assert inc.scores["hidden"][-1, -1] == np.float32(inc.p_clean)


# ------------------------------------------------------------------ dataset-level noise, strict filter, buckets

def test_dataset_level_noise_is_used_and_recorded(tiny_model):
    from workbench.tracing.noise import noise_level

    subjects = ["Danielle Darrieux", "Miles Davis", "Varo Keltin"]
    nu = noise_level(tiny_model, subjects, "s3")
    a = trace(tiny_model, "Miles Davis plays the", subject="Miles Davis", kinds=("hidden",), samples=2,
              noise="s3", noise_subjects=subjects)
    b = trace(tiny_model, "Miles Davis plays the", subject="Miles Davis", kinds=("hidden",), samples=2, noise=nu)
    own = trace(tiny_model, "Miles Davis plays the", subject="Miles Davis", kinds=("hidden",), samples=2)
    assert a.noise_level == pytest.approx(nu) and a.noise_rule == "s3 over 3 subjects"
    assert b.noise_rule == "given" and own.noise_rule.startswith("s3 over 'Miles Davis'")
    np.testing.assert_allclose(a.scores["hidden"], b.scores["hidden"], rtol=1e-5, atol=1e-7)
    assert own.noise_level != pytest.approx(nu)
    assert type(a).from_dict(a.to_dict()).noise_rule == a.noise_rule


def test_relation_buckets_by_hand():
    from workbench.tracing.dataset import relation_bucket_positions

    # "<bos> The mother tongue of Varo Keltin is": relation 1..4 and 7, subject 5, 6
    assert relation_bucket_positions([1, 2, 3, 4, 7], [5, 6], 8) == {
        "relation before subject": [1, 2, 3], "last relation before subject": [4], "subject": [5, 6],
        "relation after subject": [], "last token": [7]}
    # "<bos> Varo Keltin grew up speaking": subject first
    assert relation_bucket_positions([3, 4, 5], [1, 2], 6) == {
        "relation before subject": [], "last relation before subject": [], "subject": [1, 2],
        "relation after subject": [3, 4], "last token": [5]}


def test_trace_dataset_relation_buckets_and_strict_filter(peaky, monkeypatch):
    from workbench.tracing.results import RELATION_BUCKETS

    facts = _facts(peaky, monkeypatch)
    res = trace_dataset(peaky, facts, corrupt="relation", kinds=("hidden",), samples=2, progress=False)
    assert list(res.aie["hidden"].index) == list(RELATION_BUCKETS)
    assert res.noise_rule == f"s3 over {len(facts)} subjects"
    assert res.counts["subject"] > 0 and res.counts["last token"] == len(facts) - res.n_skipped
    import workbench.predict as pr

    calls = []
    monkeypatch.setattr(pr, "score_objects", lambda m, pairs: calls.append(pairs) or [pr.ObjectScore(0.0, False)])
    strict = trace_dataset(peaky, facts, kinds=("hidden",), samples=2, progress=False, known="strict")
    assert strict.n_skipped == len(facts) and len(calls) == len(facts) - res.n_skipped
    with pytest.raises(ValueError):
        trace_dataset(peaky, facts, known="sometimes", progress=False)


@pytest.mark.parametrize("kw, match", [({"window": 0}, "window must be >= 1"), ({"window": -3}, "window"),
                                       ({"window": 2.5}, "window must be an integer"),
                                       ({"noise": float("nan")}, "finite number > 0"),
                                       ({"noise": float("inf")}, "finite"), ({"noise": -0.1}, "finite number > 0"),
                                       ({"noise": "s-3"}, "std factor"), ({"noise": "snan"}, "finite"),
                                       ({"samples": 0}, "samples")])
def test_trace_parameters_are_validated(tiny_model, tmp_path, kw, match):
    """Problem 4: window <= 0 gave constant maps, NaN/inf noise NaN maps, negative noise was accepted."""
    from workbench.facts import Fact
    from workbench.tracing.api import TraceParameterError

    samples = kw.pop("samples", 2)
    with pytest.raises(TraceParameterError, match=match):
        trace(tiny_model, PROMPT, subject=SUBJECT, kinds=("mlp",), samples=samples, **kw)
    fact = Fact(subject=SUBJECT, template="The mother tongue of {} is", target_true="French")
    with pytest.raises(TraceParameterError, match=match):
        trace_dataset(tiny_model, [fact], kinds=("mlp",), progress=False, out=tmp_path / "o",
                      samples=samples, **kw)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_numpy_integer_range_corrupts_the_range(peaky):
    """Problem 4 end to end: the p_corrupt of a numpy range equals that of the int range."""
    a = trace(peaky, PROMPT, corrupt=(np.int64(4), np.int64(6)), kinds=("hidden",), samples=2, noise=0.5)
    b = trace(peaky, PROMPT, corrupt=(4, 6), kinds=("hidden",), samples=2, noise=0.5)
    assert a.corrupted_span.positions == (4, 5) and a.p_corrupt == b.p_corrupt


# --------------------------------------------------------------------------- default window


def test_default_window_rule():
    from workbench.tracing import default_window

    assert [default_window(n) for n in (1, 2, 3, 6, 12, 20, 21, 48)] == [1, 1, 2, 3, 6, 10, 10, 10]
    with pytest.raises(ValueError):
        default_window(0)


def test_trace_and_cli_use_the_default_window(tiny_model):
    """Problem 6: a window of 10 on a shallow model flattens the maps; the default is half the depth."""
    from workbench.cli import build_parser
    from workbench.tracing import trace

    r = trace(tiny_model, "The mother tongue of Varo Keltin is", subject="Varo Keltin", kinds=("mlp",), samples=1)
    assert r.window == 2  # 3 layers
    assert build_parser().parse_args(["trace", "-p", "x"]).window is None
    assert build_parser().parse_args(["sweep", "--out", "o"]).window is None
