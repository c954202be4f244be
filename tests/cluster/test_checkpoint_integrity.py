"""Checkpoint seals: every file listed with its size and sha256 (HMAC-signed with a key), verified before opening."""

from __future__ import annotations

import json

import pytest

from cluster import checkpoint_integrity as integrity
from cluster.engine import CheckpointError, InProcessContext


def _checkpoint(directory, rank=0, **files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    integrity.seal(str(directory), rank)
    return directory


def test_an_intact_checkpoint_verifies_and_every_change_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "c", weights=b"w" * 100, state=b"{}")
    (ckpt / "tag").mkdir()  # DeepSpeed writes its files one folder down
    (ckpt / "tag" / "model_states.pt").write_bytes(b"m")
    integrity.seal(str(ckpt), 0)
    assert integrity.verify(str(ckpt)) is None
    (ckpt / "weights").write_bytes(b"w" * 99 + b"x")
    assert integrity.verify(str(ckpt)) == "weights does not match the sha256 in its seal"
    (ckpt / "weights").write_bytes(b"w" * 10)
    assert integrity.verify(str(ckpt)) == "weights has 10 bytes, its seal says 100"
    (ckpt / "weights").unlink()
    assert integrity.verify(str(ckpt)) == "weights is missing"
    (ckpt / "weights").write_bytes(b"w" * 100)
    (ckpt / "tag" / "model_states.pt").write_bytes(b"M")
    assert integrity.verify(str(ckpt)) == "tag/model_states.pt does not match the sha256 in its seal"
    (ckpt / "tag" / "model_states.pt").write_bytes(b"m")
    (ckpt / "tag" / "planted.pt").write_bytes(b"x")
    assert integrity.verify(str(ckpt)) == "tag/planted.pt is not listed in any seal (a file added after the checkpoint was written)"
    assert "no integrity seal" in integrity.verify(str(_checkpoint_unsealed(tmp_path / "old")))


def _checkpoint_unsealed(directory):
    directory.mkdir()
    (directory / "weights").write_bytes(b"w")
    return directory


def test_every_ranks_seal_covers_its_own_files(tmp_path):
    ckpt = tmp_path / "c"
    for rank in (0, 1):
        share = tmp_path / f"rank{rank}"
        _checkpoint(share, rank, **{f"part{rank}.pt": bytes([rank]) * 8})
        for f in share.iterdir():  # Ray merges every rank's folder into one checkpoint
            ckpt.mkdir(exist_ok=True)
            (ckpt / f.name).write_bytes(f.read_bytes())
    assert integrity.verify(str(ckpt)) is None
    (ckpt / "part1.pt").write_bytes(b"\x00" * 8)
    assert integrity.verify(str(ckpt)) == "part1.pt does not match the sha256 in its seal"


def test_with_a_key_a_rewritten_seal_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(integrity.KEY_ENV, "run-secret")
    ckpt = _checkpoint(tmp_path / "c", weights=b"good")
    assert integrity.verify(str(ckpt)) is None
    (ckpt / "weights").write_bytes(b"evil")
    integrity.seal(str(ckpt), 0)  # a forger rewrites the seal, but has no key
    seal = json.loads((ckpt / "integrity-rank0.json").read_text())
    monkeypatch.setenv(integrity.KEY_ENV, "guessed")
    integrity.seal(str(ckpt), 0)
    monkeypatch.setenv(integrity.KEY_ENV, "run-secret")
    assert integrity.verify(str(ckpt)) == f"its seal integrity-rank0.json is not signed with this run's {integrity.KEY_ENV}"
    seal["signature"] = None
    (ckpt / "integrity-rank0.json").write_text(json.dumps(seal))
    assert integrity.verify(str(ckpt)) is not None


def test_the_engine_falls_back_to_the_newest_intact_checkpoint_and_refuses_when_none_is(tmp_path):
    ctx = InProcessContext(str(tmp_path / "ckpts"))
    for step in (1, 2, 3):
        share = tmp_path / f"tmp{step}"
        share.mkdir()
        (share / "step").write_text(str(step))
        ctx.report({"step": step}, checkpoint_dir=str(share))
    restored = ctx.restore_checkpoint()
    assert (tmp_path / restored.local_dir / "step").read_text() == "3"
    newest = sorted((tmp_path / "ckpts").iterdir())
    (newest[-1] / "step").write_text("9")
    assert open(f"{ctx.restore_checkpoint().local_dir}/step").read() == "2"
    for c in newest[:-1]:
        (c / "extra.pkl").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from") as err:
        ctx.restore_checkpoint()
    assert str(err.value).count("extra.pkl is not listed") == 2 and "step does not match" in str(err.value)
