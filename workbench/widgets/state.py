"""The Inspector's values that are not widgets: an edit's outcome on its prompt, trace merging."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

SUCCESS_P = 0.5
"""An edit succeeds when the new object is the prompt's top-1 token with at least this probability."""

def _noise_value(text: str) -> str | float:
    """The noise field: ``"s3"``, ``"u0.5"``, ... stay strings; plain numbers become floats."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return text


def _merge_traces(parts: Sequence[Any]) -> Any:
    """One TraceResult holding the scores of per-kind traces of the same prompt and noise."""
    if len(parts) == 1:
        return parts[0]
    scores: dict = {}
    kinds: list = []
    for part in parts:
        scores.update(part.scores)
        kinds.extend(part.kinds)
    return dataclasses.replace(parts[0], scores=scores, kinds=tuple(kinds))


@dataclass
class EditOutcome:
    """Whether an applied edit reached its new object on the edit prompt."""

    prompt: str
    new_object: str
    p_new: float
    top_token: str
    top_p: float
    top_is_new: bool

    @property
    def success(self) -> bool:
        """The new object's first token is top-1 with P(new) >= :data:`SUCCESS_P`."""
        return self.top_is_new and self.p_new >= SUCCESS_P


def prompt_outcome(model: Any, prompt: str, new_object: str) -> EditOutcome:
    """P(first token of ``new_object``) and the top-1 token of ``prompt`` under the model as it is.

    The Inspector's own success rule (top-1 and P >= :data:`SUCCESS_P`), on the model as shown; an edit's
    recorded outcome (:func:`workbench.editing.edit_outcome`) is the teacher-forced all-tokens check.
    """
    from ..predict import next_token_probs, object_token_ids

    probs = next_token_probs(model, [prompt])[0]
    new_id = object_token_ids(model, new_object)[0]
    top_p, top_id = probs.max(0)
    return EditOutcome(prompt=prompt, new_object=new_object, p_new=float(probs[new_id]),
                       top_token=model.tokenizer.decode([int(top_id)]), top_p=float(top_p),
                       top_is_new=int(top_id) == new_id)
