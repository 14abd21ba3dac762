"""The bundled world's covariance corpus is generated once per version of its file, not once per edit."""

from __future__ import annotations

import os
import shutil

from workbench.editing import corpus
from workbench.loading import assets_dir


def test_world_text_generated_once_per_file_version(tmp_path, monkeypatch):
    folder = tmp_path / "assets" / "toy-facts"
    folder.mkdir(parents=True)
    shutil.copy(assets_dir() / "toy-facts" / "world.json", folder / "world.json")
    monkeypatch.setenv("WORKBENCH_ASSETS", str(tmp_path / "assets"))
    from workbench.toyworld.world import World

    loads = []
    load = World.load.__func__

    def counted(cls, path):
        loads.append(path)
        return load(cls, path)

    monkeypatch.setattr(World, "load", classmethod(counted))
    first = corpus.resolve_corpus(None, "toy-facts")
    second = corpus.resolve_corpus(None, "toy-facts")
    assert first == second and len(loads) == 1
    second[1].append("changed by a caller")  # callers get their own list
    assert corpus.resolve_corpus(None, "toy-facts") == first
    stat = os.stat(folder / "world.json")
    os.utime(folder / "world.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    assert corpus.resolve_corpus(None, "toy-facts") == first and len(loads) == 2
