"""The notebooks: stored without outputs, and each runs top to bottom on the bundled model.

Execution uses nbclient with the current interpreter's ``python3`` kernel (the same as
``pytest --nbmake notebooks/``). It needs the bundled model; without it the execution
tests skip.

Headless runs and lost replies. While a client waits for a cell's ``execute_reply`` on the
shell socket, nbclient answers Output-widget captures (``with out:``) by sending ``comm_msg``
to the kernel on that same socket; on a heavily loaded machine a reply that arrived during
such a send was never read (the kernel had sent it and published ``status: idle``), and with
no cell timeout (``jupyter nbconvert --execute``'s default) both processes idled forever.
The Inspector no longer captures (see ``test_outputs_are_set_not_captured``), every cell here
has a timeout, and :func:`reply_tolerant_client` ends a cell on the kernel's idle status for
it when the reply is still missing ``REPLY_GRACE`` seconds later (by then every output, errors
included, has arrived on IOPub), so a headless run finishes or fails, never hangs.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

REPLY_GRACE = 30.0
"""Seconds to wait for a cell's execute_reply after the kernel reported the cell finished."""

CELL_TIMEOUT = 600
"""Seconds one cell may run (a busy 2-core machine runs the slowest cell in ~5 min)."""


def reply_tolerant_client(book, **kwargs):
    """An nbclient ``NotebookClient`` that survives a lost ``execute_reply`` (module docstring)."""
    import nbclient

    class ReplyTolerantClient(nbclient.NotebookClient):
        reply_grace: float = REPLY_GRACE

        async def _async_poll_for_reply(self, msg_id, cell, timeout, task_poll_output_msg,
                                        task_poll_kernel_alive):
            waiter = asyncio.ensure_future(super()._async_poll_for_reply(
                msg_id, cell, timeout, task_poll_output_msg, task_poll_kernel_alive))
            idle_since = None
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=1.0)
                if done:
                    return waiter.result()
                if not task_poll_output_msg.done():
                    continue  # the kernel is still running the cell
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since < self.reply_grace:
                    continue
                waiter.cancel()
                task_poll_kernel_alive.cancel()
                self.lost_replies.append(cell.source.splitlines()[0] if cell.source else "")
                errors = [o for o in cell.outputs if o.get("output_type") == "error"]
                content = {"status": "error" if errors else "ok", "execution_count": None}
                if errors:
                    content.update(ename=errors[0]["ename"], evalue=errors[0]["evalue"],
                                   traceback=errors[0]["traceback"])
                return {"parent_header": {"msg_id": msg_id}, "header": {}, "metadata": {}, "content": content}

    client = ReplyTolerantClient(book, **kwargs)
    client.lost_replies = []
    return client

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_inspector", "03_entity_vs_relation", "04_editing", "05_teaching_demo"]


def test_all_notebooks_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nbformat = pytest.importorskip("nbformat")
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    from workbench.loading import ModelLoadError, bundled_path

    try:
        bundled_path()
    except ModelLoadError:
        pytest.skip("bundled model not built yet")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    book = nbformat.read(path, as_version=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The kernel inherits this: one thread is fastest for the small bundled model, and far
    # faster than several on a busy machine (threads spin-wait for each other).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel imports this checkout's package, whatever the install state of the venv.
    root = str(path.parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    client = reply_tolerant_client(book, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - started
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    lost = f"; execute_reply lost for {client.lost_replies} (finished on the kernel's idle status)" \
        if client.lost_replies else ""
    print(f"{path.name}: {elapsed:.1f} s{lost}")


def test_lost_reply_does_not_hang(tmp_path):
    """A cell whose execute_reply never arrives ends on the kernel's idle status instead of hanging."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1\nprint('first')"),
                                           nbformat.v4.new_code_cell("print(x + 1)")])
    client = reply_tolerant_client(book, timeout=60, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
    dropped: list[str] = []
    with client.setup_kernel():
        shell = client.kc.shell_channel
        original = shell.get_msg

        async def drop_first_reply(*args, **kwargs):  # the first execute_reply is lost on the way
            msg = await original(*args, **kwargs)
            if msg["msg_type"] == "execute_reply" and not dropped:
                dropped.append(msg["parent_header"]["msg_id"])
                return await original(*args, **kwargs)  # wait for a reply that never comes
            return msg

        shell.get_msg = drop_first_reply
        client.reply_grace = 2.0
        started = time.perf_counter()
        for i, cell in enumerate(book.cells):
            client.execute_cell(cell, i)
    assert dropped and client.lost_replies == ["x = 1"]
    assert book.cells[0].outputs[0]["text"] == "first\n" and book.cells[1].outputs[0]["text"] == "2\n"
    assert time.perf_counter() - started < 50


# --------------------------------------------------------------------------- what the notebooks say (issue 22, problem 8)


def _markdown(stem: str, kinds: tuple[str, ...] = ("markdown",)) -> list[str]:
    nbformat = pytest.importorskip("nbformat")
    book = nbformat.read(next(p for p in NOTEBOOKS if p.stem == stem), as_version=4)
    return [c.source for c in book.cells if c.cell_type in kinds]


def _teaching_fact(toy_model):
    import workbench as wb
    from workbench.report import diverse_order, known_facts

    return known_facts(toy_model, diverse_order(wb.load_facts("toy-facts")), limit=1)[0]


def test_quickstart_points_newcomers_to_the_teaching_demo():
    """The "Next" list names the teaching demo first (it explains what the other notebooks assume)."""
    nxt = next(s for s in _markdown("01_quickstart") if s.startswith("Next"))
    assert nxt.index("05_teaching_demo") < min(nxt.index(n) for n in ("02_inspector", "03_entity", "04_editing"))


def test_teaching_demo_suggests_substrings_of_its_prompt(toy_model):
    """Every ``corrupt="..."`` the teaching demo suggests (text or code) occurs once in the prompt it traces."""
    import re

    fact = _teaching_fact(toy_model)
    cells = _markdown("05_teaching_demo", ("markdown", "code"))
    suggested = [w for s in cells for w in re.findall(r'corrupt="([^"]+)"', s)]
    suggested = [w for w in suggested if w not in ("subject", "relation")]
    assert suggested
    for word in suggested:
        assert fact.prompt.count(word) == 1, (word, fact.prompt)


def test_teaching_demo_window_claims_hold(toy_model):
    """Step 3's text, on the map it shows: one MLP (window 1) at the subject's last token brings back about
    what the whole hidden state does there; at the last token a window brings back more than one layer."""
    from workbench.tracing import default_window, trace

    fact = _teaching_fact(toy_model)
    kw = dict(subject=fact.subject, samples=10)
    hidden = trace(toy_model, fact.prompt, kinds=("hidden",), **kw)
    narrow = trace(toy_model, fact.prompt, kinds=("mlp", "attn"), window=1, **kw)
    wide = trace(toy_model, fact.prompt, kinds=("mlp", "attn"), window=default_window(toy_model.cfg.n_layers), **kw)
    s, last = max(hidden.subject_span.positions), len(hidden.tokens) - 1
    assert narrow.scores["mlp"][s].max() >= 0.8 * hidden.scores["hidden"][s].max() > hidden.p_corrupt + 0.2
    assert narrow.scores["attn"][s].max() < hidden.p_corrupt + 0.05  # next to nothing
    for kind in ("mlp", "attn"):
        assert wide.scores[kind][last].max() > narrow.scores[kind][last].max() + 0.1
    text = " ".join(_markdown("05_teaching_demo"))
    assert "layer 0" in text and "changes\nlittle, and ROME" in text  # the small-model reading, GPT-2 XL's aside


def test_entity_vs_relation_names_buckets_each_map_has():
    """Notebook 03 asks about the relation map only in the relation map's own buckets."""
    import re

    from workbench.tracing.results import BUCKETS, RELATION_BUCKETS

    text = " ".join(_markdown("03_entity_vs_relation")).replace("\n", " ")
    checked = 0
    for sentence in re.split(r"(?<=[.?!])\s+", text):
        names = [n for n in re.findall(r"\*([a-z ]+)\*", sentence) if n in BUCKETS or n in RELATION_BUCKETS]
        if names and re.search(r"relation (corrupted|sweep|span|map)", sentence):
            checked += 1
            assert all(n in RELATION_BUCKETS for n in names), (sentence, names)
    assert checked
