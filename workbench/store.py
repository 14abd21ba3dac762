"""Resumable result stores: one folder, one key, one writer, append-only rows.

Every resumable run (trace sweeps, evaluations, ...) writes its finished rows through a
:class:`ResultStore`. The contract:

* **The key says what determines a row.** The caller passes ``key``: a JSON-able dict of
  everything a row depends on (facts-file content hash, method kwargs and resolved
  hyperparameters, model fingerprint, seeds, probe-bank version, ...). The folder's
  ``config.json`` records it with the store's ``kind`` and :data:`FORMAT_VERSION`. Opening
  the folder again with another key (or kind, or format) raises :class:`StoreMismatchError`
  naming the differing fields; a folder with rows but no ``config.json`` is refused too
  (nobody can tell what those rows were computed with). Selection arguments that only
  pick *which* rows to compute (a sample size, a list of methods to run) belong outside
  the key, as long as the key covers what each row's value depends on.
* **Rows carry their key and a checksum.** Each appended row gets ``"store_key"`` (the key's
  hash) and ``"checksum"``: the SHA-256 of the whole row (:mod:`workbench.integrity`), so a
  changed number in an otherwise valid JSON line is detected. Rows with another key's hash
  (a file copied between folders) are skipped and counted in :attr:`ResultStore.foreign`;
  a row without its store key or whose checksum does not match is damaged (below). Two
  intact rows with the same id (``id_fields``) but different content cannot come from this
  store (an append refuses an id already present): the folder is refused with
  :class:`StoreIntegrityError` naming both lines, so neither a forged row placed first nor
  the genuine one silently wins. Identical copies are kept once.
* **One writer.** While open, the store holds an exclusive ``fcntl.flock`` on
  ``DIR/.lock`` (non-blocking); a second opener gets :class:`StoreLockedError` naming the
  holder's pid. The lock ends with the process, so a killed run never leaves it stale.
* **Append-only, all-or-nothing, damage-tolerant.** Rows are JSON lines in ``DIR/<rows>``.
  Each append writes one whole line, then fsyncs; a write that fails part-way (a full
  disk) is cut back off the file before the error (:class:`StoreWriteError`) propagates,
  and every append first cuts a torn tail left by a process killed mid-write, so a later
  row can never be glued to a partial one and lost. Reading never truncates: a line that
  does not parse, lacks its store key or fails its checksum is skipped, counted in
  :attr:`ResultStore.damaged` (line numbers in :attr:`ResultStore.damaged_lines`),
  reported with a warning naming the file and lines, and recomputed by the run; damaged
  lines in the middle stay on disk untouched. Folders written before row checksums
  (store format 1) are refused with a message saying so.

Usage::

    with ResultStore.open(out, kind="trace-sweep", key=key, id_fields=("index",)) as store:
        for i, fact in enumerate(facts):
            if i in store:            # or: (i,) in store.done
                continue
            store.append({"index": i, ...})
        rows = store.rows()
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .integrity import CHECKSUM_FIELD, IntegrityError, record_checksum, seal, verify, write_error

__all__ = ["FORMAT_VERSION", "ResultStore", "StoreError", "StoreIntegrityError", "StoreLockedError",
           "StoreMismatchError", "StoreWriteError", "content_hash", "key_hash"]

FORMAT_VERSION = 2
"""Version of the store layout (``config.json`` + JSON lines, each row with its checksum); part of every
store's identity. Format 1 rows carried no checksum."""

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A result store cannot be used as asked; the message names the folder and the fix."""


class StoreLockedError(StoreError):
    """Another process holds the store's lock."""


class StoreIntegrityError(StoreError, IntegrityError):
    """A store's files contradict themselves (a sealed config that does not match, two different rows for one id)."""


class StoreWriteError(StoreError, OSError):
    """A row could not be written (e.g. the disk is full); nothing of it is left in the file."""


class StoreMismatchError(StoreError, ValueError):
    """The folder holds rows computed under another key (or holds rows without a config)."""

    def __init__(self, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = list(fields)


def _normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, numpy scalars plain numbers)."""
    return json.loads(json.dumps(value, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def key_hash(key: Any) -> str:
    """A short stable hash of a JSON-able key (order of dict keys does not matter)."""
    text = json.dumps(_normal(key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_hash(items: Iterable[Any]) -> str:
    """A short hash of a sequence of JSON-able items (e.g. every fact's full dict), order-sensitive."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(_normal(item), sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(path)
            else:
                out += _diff(old[k], new[k], path)
        return out
    return [] if old == new else [prefix or "<key>"]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ResultStore:
    """An open result store (see the module docstring); use :meth:`open` as a context manager."""

    CONFIG = "config.json"
    LOCK = ".lock"

    def __init__(self, folder: Path, kind: str, key: dict, id_fields: tuple[str, ...], rows_name: str,
                 lock_fd: int):
        self.folder = folder
        self.kind = kind
        self.key = key
        self.key_hash = key_hash(key)
        self.id_fields = id_fields
        self.path = folder / rows_name
        self._lock_fd: int | None = lock_fd
        self._rows: dict[tuple[str, ...], dict] = {}
        self.damaged = 0
        """Lines of the rows file that could not be read (skipped, kept on disk)."""
        self.damaged_lines: list[int] = []
        """1-based line numbers of the damaged lines."""
        self.foreign = 0
        """Rows stamped with another key's hash (skipped)."""
        self.duplicates = 0
        """Rows whose id was already present (the first is kept)."""
        self._torn_at: int | None = None  # offset of a torn last line (no newline), if any
        self._load()

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(cls, folder: str | os.PathLike, *, kind: str, key: dict, id_fields: Sequence[str] = ("id",),
             rows_name: str = "rows.jsonl") -> "ResultStore":
        """Open (creating if needed) the store in ``folder``: take the lock, check the key, read the rows.

        Raises :class:`StoreLockedError` when another process has it open,
        :class:`StoreMismatchError` when it was made with another key/kind/format or has rows
        but no config, and :class:`StoreError` when ``folder`` is not a usable directory.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise StoreError(f"{folder} is a file, not a folder; give --out a folder path (new or one made by "
                             f"an earlier run)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the result folder {folder}: {err.strerror or err}") from err
        fd = cls._lock(folder)
        try:
            cls._check_config(folder, kind, key, rows_name)
            return cls(folder, kind, key, tuple(id_fields), rows_name, fd)
        except BaseException:
            cls._unlock(fd)
            raise

    @classmethod
    def _lock(cls, folder: Path) -> int:
        path = folder / cls.LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                raise StoreLockedError(
                    f"{folder} is in use by another run ({who}); wait for it to finish, or give this run "
                    f"another --out folder") from None
            raise StoreError(f"cannot lock {path}: {err}") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @staticmethod
    def _unlock(fd: int | None) -> None:
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @classmethod
    def _check_config(cls, folder: Path, kind: str, key: dict, rows_name: str) -> None:
        config = {"format_version": FORMAT_VERSION, "kind": kind, "key": _normal(key), "key_hash": key_hash(key)}
        cfg_path = folder / cls.CONFIG
        rows_path = folder / rows_name
        if not cfg_path.exists():
            if rows_path.exists() and rows_path.stat().st_size > 0:
                raise StoreMismatchError(
                    f"{rows_path} holds rows but {cfg_path} is missing, so nothing says which settings those "
                    f"rows were computed with; delete the folder (or restore its config.json), or give this "
                    f"run another --out folder", ["config.json"])
            from .integrity import atomic_write

            try:
                atomic_write(cfg_path, json.dumps(seal(config), indent=1, sort_keys=True).encode(),
                             what="store config")
            except OSError as err:
                raise StoreError(str(err)) from None
            return
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as err:
            raise StoreMismatchError(f"{cfg_path} cannot be read ({err}); delete the folder or give this run "
                                     f"another --out folder", ["config.json"]) from None
        if not isinstance(old, dict) or "format_version" not in old or "key" not in old:
            raise StoreMismatchError(
                f"{folder} was written by an older workbench (its config.json has no store key); delete it or "
                f"give this run another --out folder", ["format_version"])
        if isinstance(old.get("format_version"), int) and old["format_version"] < FORMAT_VERSION:
            raise StoreMismatchError(
                f"{folder} was written by an older workbench (store format {old['format_version']}, rows without "
                f"checksums), so its rows cannot be verified; delete it (or move it away) to recompute, or give "
                f"this run another --out folder", ["format_version"])
        sealed, old = old, {k: v for k, v in old.items() if k != CHECKSUM_FIELD}
        fields = []
        if old.get("format_version") != FORMAT_VERSION:
            fields.append("format_version")
        if old.get("kind") != kind:
            fields.append("kind")
        fields += [f"key.{p}" if p != "<key>" else "key" for p in _diff(old.get("key"), config["key"])]
        if fields:
            detail = []
            for f in fields[:6]:
                a, b = _lookup(old, f), _lookup(config, f)
                detail.append(f"{f}: folder has {_short(a)}, this run {_short(b)}")
            more = f" (and {len(fields) - 6} more)" if len(fields) > 6 else ""
            raise StoreMismatchError(
                f"{folder} holds results computed with other settings ({'; '.join(detail)}{more}); their rows "
                f"cannot be reused. Give this run another --out folder, or delete {folder} to start over",
                fields)
        # the same settings: the config must also be the one this store wrote (not edited to match)
        verify(sealed, where=str(cfg_path), error=StoreIntegrityError,
               fix=f"the folder's settings cannot be trusted: delete {folder} or give this run another --out folder")

    # ----------------------------------------------------------------- rows

    def _id(self, row: dict) -> tuple[str, ...]:
        try:
            return tuple(str(row[f]) for f in self.id_fields)
        except KeyError as err:
            raise StoreError(f"a row of {self.path} lacks its id field {err.args[0]!r} "
                             f"(id fields: {list(self.id_fields)})") from None

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        self._torn_at = len(raw) - len(tail) if tail else None
        first_line: dict[tuple[str, ...], int] = {}
        for n, line in enumerate(lines + ([tail] if tail else []), start=1):
            if not line.strip():
                continue
            try:
                if tail and n == len(lines) + 1:
                    raise ValueError("no newline at the end (a write was cut short)")
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                ident = self._id(row)
                if "store_key" not in row:
                    raise ValueError("no store key")
            except (ValueError, StoreError):
                self.damaged += 1
                self.damaged_lines.append(n)
                continue
            if row["store_key"] != self.key_hash:
                self.foreign += 1
                continue
            if row.get(CHECKSUM_FIELD) != record_checksum(row):
                self.damaged += 1
                self.damaged_lines.append(n)
                continue
            if ident in self._rows:
                if self._rows[ident][CHECKSUM_FIELD] != row[CHECKSUM_FIELD]:  # (NaN != NaN: compare sums)
                    raise StoreIntegrityError(
                        f"{self.path} holds two different rows for {dict(zip(self.id_fields, ident))} (lines "
                        f"{first_line[ident]} and {n}); a store never writes an id twice, so the file was edited "
                        f"and neither row can be trusted: delete both lines to recompute that row, or delete "
                        f"{self.folder} to start over")
                self.duplicates += 1
                continue
            self._rows[ident] = row
            first_line[ident] = n
        if self.damaged:
            where = ", ".join(map(str, self.damaged_lines[:10])) + (" ..." if self.damaged > 10 else "")
            msg = (f"{self.path}: {self.damaged} damaged line(s) skipped (line {where}: unreadable, without "
                   f"their store key, or not matching their checksum); the intact rows are used and the skipped "
                   f"ones will be recomputed")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        if self.foreign:
            msg = f"{self.path}: {self.foreign} row(s) computed under another key skipped"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    @property
    def done(self) -> frozenset[tuple[str, ...]]:
        """Ids of the rows present: tuples of ``str(row[f])`` for ``f`` in ``id_fields``."""
        return frozenset(self._rows)

    def __contains__(self, ident: Any) -> bool:
        values = ident if isinstance(ident, tuple) else (ident,)
        return tuple(str(v) for v in values) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, ident: Any) -> dict | None:
        """The row with id ``ident`` (a value or a tuple of values), or ``None``."""
        values = ident if isinstance(ident, tuple) else (ident,)
        return self._rows.get(tuple(str(v) for v in values))

    def rows(self) -> list[dict]:
        """The readable rows of this key, one per id, in file order."""
        return list(self._rows.values())

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows())

    def append(self, row: dict) -> dict:
        """Add one finished row (stamped with ``store_key`` and its ``checksum``), all-or-nothing: one
        whole line, then fsync.

        Returns the row as it will read back. Re-appending an id already present is an error. A
        write that fails (a full disk) raises :class:`StoreWriteError` after cutting what it
        wrote, so the file holds the rows before it, intact, and nothing of this one.
        """
        if self._lock_fd is None:
            raise StoreError(f"the store {self.folder} is closed")
        stored = _normal({**row, "store_key": self.key_hash})
        stored = seal(stored)
        ident = self._id(stored)
        if ident in self._rows:
            raise StoreError(f"{self.path} already holds the row {dict(zip(self.id_fields, ident))}; a run "
                             f"computes each row once (were two inputs given the same id?)")
        line = json.dumps(stored, separators=(",", ":")).encode() + b"\n"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreWriteError(str(write_error(self.path, err, "result rows"))) from None
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if self._torn_at is not None:
                # A torn last line is a write cut short (this process's or a killed one's): nothing
                # intact follows it, and this row must not be glued to it. Cut it (it was counted in
                # ``damaged``).
                end = self._torn_at
            elif end and os.pread(fd, 1, end - 1) != b"\n":
                end = _after_last_newline(fd, end)
            if end != os.lseek(fd, 0, os.SEEK_END):
                os.ftruncate(fd, end)
            self._torn_at = None
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as err:
                try:
                    os.ftruncate(fd, end)  # all or nothing: no partial row stays behind
                    os.fsync(fd)
                except OSError:
                    self._torn_at = end  # cut it before the next append
                raise StoreWriteError(f"{write_error(self.path, err, 'result rows')}; the rows written so far "
                                      f"are kept and a rerun resumes after them") from None
        finally:
            os.close(fd)
        self._rows[ident] = stored
        return stored

    # ----------------------------------------------------------------- closing

    @property
    def closed(self) -> bool:
        return self._lock_fd is None

    def close(self) -> None:
        """Release the lock (rows already appended are on disk)."""
        fd, self._lock_fd = self._lock_fd, None
        self._unlock(fd)

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close still frees the lock
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return (f"ResultStore({str(self.folder)!r}, kind={self.kind!r}, rows={len(self._rows)}, "
                f"damaged={self.damaged}, key_hash={self.key_hash!r})")


def _after_last_newline(fd: int, end: int) -> int:
    """Offset just after the last newline before ``end`` (0 when there is none)."""
    pos = end
    while pos > 0:
        start = max(0, pos - 65536)
        block = os.pread(fd, pos - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return "<absent>"
        value = value[part]
    return value
