"""Putting figures and tables into the Inspector's Output widgets without capturing output."""

from __future__ import annotations

import json
from typing import Any

import ipywidgets as widgets


class FigureView:
    """A Plotly figure as the Plotly mimetype with ``responsive`` on, so that it fills the
    width of its output area and follows it when the page resizes."""

    def __init__(self, fig: Any) -> None:
        self.fig = fig

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        spec = json.loads(self.fig.to_json())
        spec["config"] = {"responsive": True, "displaylogo": False}
        title = getattr(self.fig.layout.title, "text", None) or "figure"
        return {"application/vnd.plotly.v1+json": spec, "text/plain": f"<Plotly figure: {title}>"}


def _displayable(obj: Any) -> Any:
    return FigureView(obj) if hasattr(obj, "to_plotly_json") else obj


def _clear(out: widgets.Output) -> None:
    """Empty an Output widget now (``clear_output(wait=True)`` would wait for the next output)."""
    out.outputs = ()


def _show(out: widgets.Output, *objs: Any) -> None:
    """Replace an Output widget's content. Sets the widget's outputs directly instead of
    capturing with ``with out:``, so it works from a background thread and without a kernel."""
    _clear(out)
    for obj in objs:
        out.append_display_data(_displayable(obj))
