"""Tests of the synthetic world generator and the bundled toy-facts model (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.toyworld.train import BUNDLE_SEED
from workbench.toyworld.world import (
    RELATION_FIRST, SUBJECT_FIRST, World, leaked_held_out, make_world,
)

BUNDLE = Path(__file__).resolve().parents[2] / "assets" / "toy-facts"


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(BUNDLE_SEED)


@pytest.fixture(scope="module")
def tokenizer():
    if not (BUNDLE / "tokenizer.json").exists():
        pytest.skip("bundled toy-facts tokenizer missing")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUNDLE))


def _load(name: str):
    path = BUNDLE / name
    if not path.exists():
        pytest.skip(f"{path} missing")
    return json.loads(path.read_text(encoding="utf-8"))


def test_deterministic(world: World) -> None:
    assert make_world(BUNDLE_SEED).to_json() == world.to_json()
    assert make_world(BUNDLE_SEED + 1).to_json() != world.to_json()
    assert World.from_json(world.to_json()).to_json() == world.to_json()
    assert world.training_text(3)[:50] == make_world(BUNDLE_SEED).training_text(3)[:50]


def test_bundle_world_matches_generator(world: World) -> None:
    assert _load("world.json") == json.loads(world.to_json())


def test_counts(world: World) -> None:
    assert len(world.subjects) >= 300 and len(set(world.subjects)) == len(world.subjects)
    assert len(world.relations) >= 8
    for rel in world.relations:
        assert len(rel.templates) >= 5
        assert len(rel.template_indices(RELATION_FIRST)) >= 2
        assert len(rel.template_indices(SUBJECT_FIRST)) >= 2
        assert len(set(rel.objects)) >= 10
        for t in rel.templates:
            assert t.text.count("{}") == 1 and not t.text.endswith(" ")
            assert t.text.startswith("{}") == (t.kind == SUBJECT_FIRST)
    assert len(world.facts) == len(world.subjects) * len(world.relations)
    assert all(world.facts[(s, r.id)] in r.objects for s in world.subjects for r in world.relations)


def test_held_out(world: World) -> None:
    held_subjects = world.held_out_subjects
    assert abs(len(held_subjects) / len(world.subjects) - 0.2) < 0.01
    assert len(world.prompts("held_out")) == len(held_subjects) * len(world.relations)
    assert leaked_held_out(world, world.training_text(0)) == []
    assert leaked_held_out(world, world.training_text(7)) == []


def test_objects_single_token(world: World, tokenizer) -> None:
    for rel in world.relations:
        for o in rel.objects:
            assert len(tokenizer.encode(" " + o, add_special_tokens=False)) == 1, o


def test_subject_token_counts(world: World, tokenizer) -> None:
    for prefix in (" ", ""):
        counts = {len(tokenizer.encode(prefix + s, add_special_tokens=False))
                  for s in world.subjects}
        assert counts == {2}, "every subject is one first-name token and one surname token"


def test_no_single_word_identifies_a_subject(world: World) -> None:
    """The recall site is the subject's last token because only the combination names someone."""
    firsts = [s.split(" ")[0] for s in world.subjects]
    lasts = [s.split(" ")[1] for s in world.subjects]
    assert all(len(s.split(" ")) == 2 for s in world.subjects)
    assert min(firsts.count(w) for w in firsts) >= 10
    assert min(lasts.count(w) for w in lasts) >= 10
    # the facts of one surname's subjects differ: the surname alone does not give the object
    for rel in world.relations:
        for last in set(lasts):
            objs = {world.facts[(s, rel.id)] for s in world.subjects if s.endswith(" " + last)}
            assert len(objs) >= 3


def test_combination_names_errors() -> None:
    import random

    from workbench.toyworld.world import make_combination_names

    with pytest.raises(ValueError, match="combinations"):
        make_combination_names(10, random.Random(0), ["A", "B"], ["C", "D"])
    with pytest.raises(ValueError, match="names must be"):
        make_world(0, names="unknown")
    names = make_combination_names(12, random.Random(0), ["A", "B", "C", "D"], ["E", "F", "G", "H"])
    words = [w for n in names for w in n.split(" ")]
    assert len(set(names)) == 12 and min(words.count(w) for w in words) >= 2


def test_tokenizer_offsets_and_bos(tokenizer) -> None:
    enc = tokenizer("The pet of Varo Kel is a", return_offsets_mapping=True,
                    add_special_tokens=False)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"


def test_counterfact_records(world: World) -> None:
    records = _load("counterfact.json")
    assert len(records) == len(world.facts)
    for r in records[:200]:
        for key in ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                    "attribute_prompts", "generation_prompts", "neighborhood_targets",
                    "relation_first_prompts", "subject_first_prompts"):
            assert key in r
        rw = r["requested_rewrite"]
        assert set(rw) >= {"prompt", "subject", "target_new", "target_true", "relation_id"}
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert rw["target_true"]["str"] == world.facts[(rw["subject"], rw["relation_id"])]
        assert "{}" in rw["prompt"]
        assert rw["prompt"].format(rw["subject"]) not in [p["prompt"] for p in
                                                          world.prompts("held_out")]
        assert len(r["neighborhood_prompts"]) == len(r["neighborhood_targets"]) >= 5


def test_known_records() -> None:
    records = _load("known_1000.json")
    assert len(records) >= 500
    for r in records:
        assert set(r) >= {"known_id", "subject", "attribute", "template", "prediction",
                          "prompt", "relation_id"}
        assert r["prompt"] == r["template"].format(r["subject"])


def test_bundled_model_accuracy(world: World, tokenizer) -> None:
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from workbench.toyworld.train import prompt_accuracy

    model = AutoModelForCausalLM.from_pretrained(str(BUNDLE))
    sample = random.Random(0).sample(world.prompts("train"), 300)
    with torch.no_grad():
        acc = prompt_accuracy(model, tokenizer, [p["prompt"] for p in sample],
                              [p["target"] for p in sample])
    assert acc >= 0.98
