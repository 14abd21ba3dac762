"""The default MLP/attention window: ROME's 10 layers, at most half the model's depth."""

from __future__ import annotations

import math
from typing import Any


def default_window(n_layers: int) -> int:
    """``min(10, ceil(n_layers / 2))``: ROME's window of 10 on deep models (GPT-2 XL has 48 layers).

    On a shallow model a window of 10 covers every layer, so each MLP/attention cell restores
    the whole stack and the maps come out constant along the layer axis; half the depth
    keeps them informative (3 on the bundled 6-layer model).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, not {n_layers}")
    return min(10, math.ceil(n_layers / 2))


def resolve_window(model: Any, window: int | None) -> Any:
    """``window`` itself (validated by the tracing entry points), or :func:`default_window` of the
    model's depth when it is ``None``."""
    return default_window(int(model.cfg.n_layers)) if window is None else window
