"""Span finding from character offsets (issue: foundation)."""

from __future__ import annotations

import pytest

from workbench.spans import Span, SpanError, relation_span, resolve_span, subject_span, substring_span, tokenize


def joined(tokens, span):
    return "".join(tokens.str_tokens[i] for i in span)


def test_tokenize_matches_transformer_lens(tiny_model):
    for prompt in ["The capital of France is", "Danielle Darrieux speaks"]:
        tokens = tokenize(tiny_model, prompt)
        assert list(tokens.ids) == tiny_model.to_tokens(prompt)[0].tolist()
        assert tokens.has_bos and tokens.str_tokens[0] == tiny_model.tokenizer.bos_token
        no_bos = tokenize(tiny_model, prompt, prepend_bos=False)
        assert list(no_bos.ids) == tiny_model.to_tokens(prompt, prepend_bos=False)[0].tolist()


def test_multi_token_subject_span(tiny_model):
    tokens = tokenize(tiny_model, "The mother tongue of Danielle Darrieux is")
    span = subject_span(tokens, "Danielle Darrieux")
    assert len(span) >= 2 and span.contiguous
    assert joined(tokens, span).strip() == "Danielle Darrieux"
    assert span.last == len(tokens) - 2  # " is" follows


def test_split_relation_span_is_noncontiguous_and_ends_at_last_token(tiny_model):
    tokens = tokenize(tiny_model, "The mother tongue of Danielle Darrieux is")
    subj = subject_span(tokens, "Danielle Darrieux")
    rel = relation_span(tokens, "Danielle Darrieux")
    assert not rel.contiguous
    assert rel.last == len(tokens) - 1
    assert 0 not in rel  # BOS is never part of the relation
    assert set(rel) | set(subj) == set(range(1, len(tokens)))
    assert not set(rel) & set(subj)
    assert joined(tokens, rel) == "The mother tongue of is"


def test_subject_first_relation_span(tiny_model):
    tokens = tokenize(tiny_model, "Danielle Darrieux speaks")
    subj = subject_span(tokens, "Danielle Darrieux")
    assert subj.first == 1
    rel = relation_span(tokens, "Danielle Darrieux")
    assert rel.contiguous and rel.first == subj.last + 1 and rel.last == len(tokens) - 1


def test_repeated_subject_needs_template(tiny_model):
    prompt = "Paris is Paris"
    tokens = tokenize(tiny_model, prompt)
    with pytest.raises(SpanError, match="more than once") as err:
        subject_span(tokens, "Paris")
    assert "Paris is Paris" in str(err.value)
    second = subject_span(tokens, "Paris", template="Paris is {}")
    first = subject_span(tokens, "Paris", template="{} is Paris")
    assert second.last == len(tokens) - 1 and first.first == 1


def test_missing_substring_names_prompt_and_substring(tiny_model):
    tokens = tokenize(tiny_model, "The capital of France is")
    with pytest.raises(SpanError) as err:
        substring_span(tokens, "Germany")
    assert "Germany" in str(err.value) and "The capital of France is" in str(err.value)


def test_resolve_span_forms(tiny_model):
    tokens = tokenize(tiny_model, "The capital of France is")
    assert resolve_span(tokens, (1, 3)) == Span((1, 2))
    assert resolve_span(tokens, [1, 3]) == Span((1, 3))
    assert joined(tokens, resolve_span(tokens, "capital of")).strip() == "capital of"
    assert resolve_span(tokens, "subject", subject="France") == subject_span(tokens, "France")
    with pytest.raises(SpanError):
        resolve_span(tokens, (3, 99))
    with pytest.raises(SpanError):
        resolve_span(tokens, "relation")


def test_template_mismatch_is_an_error(tiny_model):
    tokens = tokenize(tiny_model, "The capital of France is")
    with pytest.raises(SpanError, match="not the prompt"):
        subject_span(tokens, "France", template="{} is big")


def test_integer_ranges_of_any_integer_type_and_non_integers_refused(tiny_model):
    """Problem 4: (np.int64(4), np.int64(6)) was read as positions {4, 6}; (1.5, 4.2) as {1, 4}."""
    import numpy as np

    from workbench.spans import Span, SpanError, resolve_span, tokenize

    tokens = tokenize(tiny_model, "The mother tongue of Danielle Darrieux is")
    assert resolve_span(tokens, (np.int64(4), np.int64(6))) == Span.range(4, 6)
    assert resolve_span(tokens, (np.int32(1), 3)) == Span.range(1, 3)
    assert resolve_span(tokens, [np.int64(4), np.int64(6)]).positions == (4, 6)  # a list: positions
    for bad in [(1.5, 4.2), (np.float64(1), 3), [1, 2.5], (True, 3)]:
        with pytest.raises(SpanError, match="integers"):
            resolve_span(tokens, bad)
