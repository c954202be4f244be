"""The setup step's guard against a build lock left by a killed build (every later build would hang on it)."""

import os
import time

from cluster.warmup import STALE_LOCK_SECONDS, clear_stale_build_lock


def test_only_an_old_build_lock_is_removed(tmp_path, capsys):
    assert clear_stale_build_lock(tmp_path) is False  # no lock: nothing to do
    lock = tmp_path / "lock"
    lock.touch()
    assert clear_stale_build_lock(tmp_path) is False and lock.exists()  # a build may be running now
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    assert clear_stale_build_lock(tmp_path) is True and not lock.exists()
    assert "left by a build that was killed" in capsys.readouterr().out
