"""One integrity rule for every file the workbench writes and reads back.

Edits, result-store rows, covariance caches, editors and checkpoints all follow it:

* **A checksum over the whole record.** :func:`record_checksum` is a SHA-256 over the
  record's metadata (canonical JSON: sorted keys, no whitespace; the ``checksum`` field
  itself left out) and, for files that hold tensors, every tensor's name, dtype, shape and
  bytes. Changing anything (a number in the metadata, a renamed field, one bit of a
  tensor) changes the checksum. :func:`seal` adds it; :func:`verify` checks it.
* **A mismatch is an error naming the file and the fix** (:class:`IntegrityError`). A
  record without a checksum (written by a workbench before this rule) is an error too: it
  cannot be told apart from a damaged one, so it is never accepted silently.
* **Writes are atomic.** :func:`atomic_write` writes a temporary file next to the
  target, fsyncs it and renames it over the target, so a reader sees the old file or the
  new one, never half of one. A failure (full disk, read-only or missing folder, a
  folder where the file should go) is a :class:`WriteError` naming the path and the
  cause, and leaves no temporary file behind.

Building blocks for a new file type::

    write_safetensors(path, tensors, meta, header_key="workbench_thing")
    tensors, meta = read_safetensors(path, header_key="workbench_thing", what="thing file",
                                     fix="write it again", error=ThingError)
    save_torch(path, {"state": ...});  obj = load_torch(path, what="checkpoint", fix="delete it")
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["CHECKSUM_FIELD", "IntegrityError", "WriteError", "atomic_write", "canonical_json", "check_writable", "file_sha256",
           "load_torch", "read_safetensors", "record_checksum", "save_torch", "seal", "tensor_digest", "verify",
           "write_error", "write_safetensors"]

CHECKSUM_FIELD = "checksum"
"""The metadata field that holds a record's SHA-256 (left out of the checksum itself)."""

_TORCH_MAGIC = b"workbench-sealed-torch 1\n"


class IntegrityError(ValueError):
    """A file the workbench wrote does not read back as written (damaged, edited, or from an older
    workbench without checksums); the message names the file and the fix."""


class WriteError(OSError):
    """A file could not be written (disk full, read-only or missing folder, a folder in the way)."""


def canonical_json(obj: Any) -> bytes:
    """``obj`` as canonical JSON bytes: sorted keys, no whitespace (NaN and infinities as Python's json writes them)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = t.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def record_checksum(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> str:
    """SHA-256 of a whole record: its metadata (without :data:`CHECKSUM_FIELD`) and its tensors."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM_FIELD}
    digest = hashlib.sha256(canonical_json(body))
    for name in sorted(tensors or {}):
        digest.update(b"\x00" + name.encode() + b"\x00")
        digest.update(tensor_digest(tensors[name]).encode())  # type: ignore[index]
    return digest.hexdigest()


def seal(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> dict:
    """``meta`` with its :data:`CHECKSUM_FIELD` set to :func:`record_checksum` of the record."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM_FIELD}
    return {**body, CHECKSUM_FIELD: record_checksum(body, tensors)}


def verify(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None, *, where: str,
           fix: str, error: type[Exception] = IntegrityError) -> None:
    """Check a record against its checksum; raise ``error`` naming ``where`` and ``fix`` when it fails.

    ``where`` says which file (and record) is read, e.g. ``"runs/eval/rows.jsonl line 3"``.
    """
    recorded = meta.get(CHECKSUM_FIELD) if isinstance(meta, Mapping) else None
    if recorded is None:
        raise error(f"{where} has no checksum (written by an older workbench, or its metadata was edited), so "
                    f"it cannot be told apart from a damaged file; {fix}")
    try:
        actual = record_checksum(meta, tensors)
    except (TypeError, ValueError) as err:
        raise error(f"{where} cannot be checked ({err}); {fix}") from None
    if actual != recorded:
        raise error(f"{where} does not match its recorded SHA-256 (the file was damaged or edited); {fix}")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (for keys that depend on an input file's content)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing

def _why(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "the disk is full; free some space or write elsewhere"
    if err.errno == errno.EDQUOT:
        return "the disk quota is exhausted; free some space or write elsewhere"
    if err.errno in (errno.EROFS,):
        return "the file system is read-only; write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; write to a folder you may write to"
    if err.errno == errno.EISDIR:
        return "it is a folder; give a file name"
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return "its folder does not exist (or a file is in the way); create the folder or pick another path"
    return f"{err.strerror or err}; pick another path"


def write_error(path: str | os.PathLike, err: OSError, what: str = "file") -> WriteError:
    """A :class:`WriteError` for ``err`` that names ``path`` and what to do."""
    out = WriteError(err.errno, f"cannot write the {what} {os.fspath(path)}: {_why(err)}")
    out.filename = os.fspath(path)
    return out


def atomic_write(path: str | os.PathLike, data: bytes, *, what: str = "file", mkdir: bool = True) -> Path:
    """Write ``data`` to ``path`` all-or-nothing (temporary file, fsync, rename); returns the path.

    Raises :class:`WriteError` naming the path when it cannot be written (the old file, if
    any, is kept; no temporary file is left behind).
    """
    path = Path(path)
    if path.is_dir():
        raise write_error(path, OSError(errno.EISDIR, "Is a directory"), what)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if mkdir:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise write_error(path, err, what) from None
    return path


def check_writable(path: str | os.PathLike, *, what: str = "file") -> Path:
    """Refuse, before any long computation, a target ``path`` that cannot be written: a folder, a missing or
    read-only parent folder (tried by creating and removing a file there, which also holds for root)."""
    path = Path(path)
    if path.is_dir():
        raise write_error(path, OSError(errno.EISDIR, "Is a directory"), what)
    parent = path.parent
    probe = parent / f".{path.name}.{os.getpid()}.probe"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        probe.unlink()
    except OSError as err:
        raise write_error(path, err, what) from None
    return path


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *,
                      header_key: str, what: str = "file") -> Path:
    """Write ``tensors`` as safetensors with ``meta`` sealed (:func:`seal`) as JSON under ``header_key``."""
    from safetensors.torch import save

    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    sealed = seal(meta, tensors)
    data = save(tensors, metadata={header_key: json.dumps(sealed, sort_keys=True)})
    return atomic_write(path, data, what=what)


def read_safetensors(path: str | os.PathLike, *, header_key: str, what: str, fix: str,
                     error: type[Exception] = IntegrityError,
                     device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`write_safetensors` and :func:`verify` it; ``(tensors, meta)``.

    Raises ``error`` naming the file when it is unreadable, not a ``what``, or damaged.
    ``FileNotFoundError`` passes through.
    """
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    if Path(path).is_dir():
        raise error(f"{path} is a folder, not a {what}; give the file's path")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' own error types; the path is what matters
        raise error(f"{path} is not a readable {what} ({type(err).__name__}: {err}); it is truncated or "
                    f"damaged: {fix}") from None
    if header_key not in header:
        raise error(f"{path} is a safetensors file but not a {what} (no {header_key!r} metadata); {fix}")
    try:
        meta = json.loads(header[header_key])
    except ValueError as err:
        raise error(f"{path}: the {what}'s metadata is not valid JSON ({err}); {fix}") from None
    if not isinstance(meta, dict):
        raise error(f"{path}: the {what}'s metadata is not a JSON object; {fix}")
    verify(meta, tensors, where=f"{path} ({what})", fix=fix, error=error)
    return {n: t.to(device) for n, t in tensors.items()}, meta


def save_torch(path: str | os.PathLike, obj: Any, *, what: str = "checkpoint") -> Path:
    """``torch.save`` ``obj`` behind a header carrying the SHA-256 of its bytes (atomic)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    header = canonical_json({"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}) + b"\n"
    return atomic_write(path, _TORCH_MAGIC + header + payload, what=what)


def load_torch(path: str | os.PathLike, *, what: str = "checkpoint", fix: str = "delete it to start over",
               error: type[Exception] = IntegrityError, map_location: Any = None, weights_only: bool = False) -> Any:
    """Read a file written by :func:`save_torch`, checking its SHA-256 before unpickling anything."""
    data = Path(path).read_bytes()
    if not data.startswith(_TORCH_MAGIC):
        raise error(f"{path} is not a sealed {what} (written by an older workbench, or not a workbench file), "
                    f"so it cannot be checked; {fix}")
    rest = data[len(_TORCH_MAGIC):]
    line, sep, payload = rest.partition(b"\n")
    try:
        header = json.loads(line) if sep else None
        ok = (isinstance(header, dict) and header.get("bytes") == len(payload)
              and header.get("sha256") == hashlib.sha256(payload).hexdigest())
    except ValueError:
        ok = False
    if not ok:
        raise error(f"{path} does not match its recorded SHA-256 (truncated or damaged); {fix}")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001
        raise error(f"{path}: the {what} cannot be read ({type(err).__name__}: {err}); {fix}") from None
