"""The one integrity rule (workbench.integrity): whole-record checksums, atomic writes with clear errors."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from workbench.integrity import (IntegrityError, WriteError, atomic_write, load_torch, read_safetensors,
                                 record_checksum, save_torch, seal, verify, write_safetensors)


def test_checksum_covers_metadata_and_tensors():
    t = {"w": torch.arange(6.0).reshape(2, 3)}
    meta = seal({"a": 1, "b": {"c": [1, 2]}}, t)
    verify(meta, t, where="x", fix="redo")
    for changed, tensors in [({**meta, "a": 2}, t), ({**meta, "b": {"c": [1, 3]}}, t),
                             ({**{k: v for k, v in meta.items() if k != "a"}, "A": 1}, t),
                             (meta, {"w": t["w"] + 1e-6}), (meta, {"w2": t["w"]}), (meta, {})]:
        with pytest.raises(IntegrityError, match=r"x does not match its recorded SHA-256 .*; redo"):
            verify(changed, tensors, where="x", fix="redo")
    with pytest.raises(IntegrityError, match="has no checksum .* older workbench"):
        verify({"a": 1}, where="x", fix="redo")
    assert record_checksum({"b": 1, "a": 2}) == record_checksum({"a": 2, "b": 1})


def test_safetensors_roundtrip_and_damage(tmp_path):
    path = write_safetensors(tmp_path / "f.safetensors", {"w": torch.ones(3)}, {"n": 5}, header_key="k")
    tensors, meta = read_safetensors(path, header_key="k", what="test file", fix="redo")
    assert meta["n"] == 5 and torch.equal(tensors["w"], torch.ones(3))
    data = path.read_bytes()
    assert b'\\"n\\": 5' in data
    path.write_bytes(data.replace(b'\\"n\\": 5', b'\\"n\\": 6'))  # a changed number in valid metadata
    with pytest.raises(IntegrityError, match=f"{path} .test file. does not match"):
        read_safetensors(path, header_key="k", what="test file", fix="redo")
    path.write_bytes(data[:-3])
    with pytest.raises(IntegrityError, match="not a readable test file"):
        read_safetensors(path, header_key="k", what="test file", fix="redo")
    with pytest.raises(IntegrityError, match="is a folder"):
        read_safetensors(tmp_path, header_key="k", what="test file", fix="redo")


def test_atomic_write_errors_name_the_path_and_keep_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    atomic_write(target, b"old")
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(WriteError, match=f"cannot write the file {target}: the disk is full"):
        atomic_write(target, b"new")
    monkeypatch.setattr(os, "write", real_write)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with pytest.raises(WriteError, match="is a folder"):
        atomic_write(tmp_path, b"x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WriteError, match="folder does not exist"):  # a file where a folder should be
        atomic_write(blocker / "sub" / "x.bin", b"x")


def test_sealed_torch_checkpoint(tmp_path):
    path = save_torch(tmp_path / "c.pt", {"step": 3, "w": torch.ones(2)})
    assert load_torch(path)["step"] == 3
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"{path} does not match its recorded SHA-256"):
        load_torch(path)
    path.write_bytes(bytes(data[:40]))
    with pytest.raises(IntegrityError, match="does not match"):
        load_torch(path)
    torch.save({"step": 1}, path)  # an unsealed (older) checkpoint
    with pytest.raises(IntegrityError, match="not a sealed checkpoint"):
        load_torch(path)
