"""Build hook: the repository's top-level ``assets/`` ships inside the package as ``workbench/assets``.

Everything else is declared in ``pyproject.toml``. The bundled model (``assets/toy-facts``)
and MEND editor (``assets/mend-toy``) stay at the top of the repository, where
``workbench train-toy`` / ``train-mend`` write them; a wheel, ``pip install .`` or an install
from the repository URL copies them into the package, where ``workbench.loading.assets_dir``
finds them with ``importlib.resources``. Editable installs read the top-level folder directly.
Dotfiles and the files a folder's ``.gitignore`` names (training leftovers) are left out.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ASSETS = Path(__file__).resolve().parent / "assets"


def asset_files(root: Path = ASSETS) -> list[Path]:
    """The files under ``root`` that ship, relative to it."""
    files = []
    for folder in sorted(p for p in [root, *root.rglob("*")] if p.is_dir()):
        ignore = folder / ".gitignore"
        patterns = [line.strip() for line in ignore.read_text().splitlines()
                    if line.strip() and not line.startswith("#")] if ignore.exists() else []
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and \
                    not any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
                files.append(path.relative_to(root))
    return files


class BuildWithAssets(build_py):
    """``build_py`` that also copies ``assets/`` to ``<build>/workbench/assets`` (not in editable mode)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not (ASSETS / "toy-facts" / "config.json").is_file():
            raise FileNotFoundError(f"{ASSETS / 'toy-facts'} is missing: a build without it would not carry the "
                                    "bundled model (rebuild it with `workbench train-toy --out assets/toy-facts`)")
        target = Path(self.build_lib) / "workbench" / "assets"
        if target.exists():  # a stale copy from an earlier build could hold deleted files
            shutil.rmtree(target)
        for rel in asset_files():
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ASSETS / rel, dest)


setup(cmdclass={"build_py": BuildWithAssets})
