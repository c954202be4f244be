"""Precompute on a real local Ray cluster with DeepSpeed ZeRO-3 (CPU, gloo), writing through
real fsspec filesystems: local disk, and S3 on a real moto server on loopback."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest
import torch

from cluster import precompute, prepare
from cluster.cli import main as cli_main
from conftest import export_spread_teacher, kill_train_worker_when, small_config
from data_pipeline import fsio
from data_pipeline import soft_labels as store
from data_pipeline.dataset import load_manifest
from data_pipeline.layout import RunLayout
from cluster.models import load_model, save_model
from distill.model import SequentialRecommender

pytestmark = pytest.mark.integration

PRECOMPUTE = ["precompute.k=8", "precompute.rows_per_shard=40", "precompute.row_group_size=16", "precompute.batch_size=8"]


def _run_config(base: str, storage: dict, *overrides: str):
    cfg = small_config(base, *PRECOMPUTE, *overrides)
    if storage:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"storage_options": storage})})
    return cfg


def _make_teacher(cfg) -> None:
    """Prepare the dataset and export a random teacher with well-spread logits (no training needed here)."""
    prepare.run(cfg)
    layout = RunLayout(cfg.run.run_dir)
    dataset = load_manifest(layout.data, cfg.data.storage_options)
    export_spread_teacher(layout.teacher, cfg, dataset, seed=1, storage_options=cfg.data.storage_options)


# Small shards and batches: a run is killed after its third committed shard, with more still to write.
STORE = ["precompute.rows_per_shard=10", "precompute.batch_size=2"]


@pytest.fixture(scope="module", params=["local", "s3"])
def labelled(request, ray_session, tmp_path_factory):
    """One uninterrupted precompute per backend (local disk, the loopback S3 server), shared by the tests that
    read it: each precompute is a Ray Train run, the suite's time. Tests that damage a store damage a copy."""
    if request.param == "local":
        run_dir, storage = str(tmp_path_factory.mktemp("labelled") / "run"), {}
    else:
        server = request.getfixturevalue("s3_server")
        run_dir, storage = f"s3://{server['bucket']}/labelled-{uuid.uuid4().hex[:8]}", server["storage_options"]
    cfg = _run_config(run_dir, storage, *STORE)
    _make_teacher(cfg)
    precompute.run(cfg)
    return cfg, run_dir, storage


def _read_store(url: str, storage: dict) -> tuple[dict, list]:
    manifest = store.load_store_manifest(url, storage)
    tables = [store.read_shard(url, manifest, s["index"], storage, verify_checksum=True) for s in manifest["shards"]]
    return manifest, tables


def test_store_equals_the_unsharded_teacher(labelled):
    cfg, run_dir, storage = labelled
    layout = RunLayout(cfg.run.run_dir)
    manifest, tables = _read_store(layout.soft_labels, storage)
    spec = store.manifest_spec(manifest)
    teacher, _ = load_model(layout.teacher, storage)

    seq_index = np.concatenate([t.column("seq_index").to_numpy() for t in tables])
    assert sorted(seq_index.tolist()) == list(range(manifest["num_sequences"]))  # no holes, no duplicates
    checked = 0
    for table in tables:
        decoded = store.decode_positions(table, spec)
        inputs = table.column("inputs").to_pylist()
        offsets = decoded["row_offsets"].tolist()
        for row, seq in enumerate(inputs):
            with torch.no_grad():
                logits = teacher.scores(teacher(torch.tensor([seq])))[0, :, 1:]  # (n, C-1)
            top_values, top_columns = logits.topk(spec.k, dim=-1)
            a, b = offsets[row], offsets[row + 1]
            assert torch.equal(decoded["topk_ids"][a:b], top_columns + 1)  # ids exact
            # Values within fp16 rounding of the unsharded teacher's.
            tolerance = top_values.abs() * 2.0**-10 + 1e-4
            assert torch.all((decoded["topk_logits"][a:b] - top_values).abs() <= tolerance)
            assert torch.allclose(decoded["lse"][a:b], torch.logsumexp(logits, -1), atol=1e-4)
            checked += b - a
    assert checked == manifest["num_positions"] > 0


def _commits(store_url: str, storage: dict) -> int:
    fs, path = fsio.get_fs(store_url, storage)
    try:
        return sum(1 for p in fs.ls(path, detail=False, refresh=True) if p.endswith(".json") and "part-" in p)
    except FileNotFoundError:
        return 0


def test_killed_precompute_reruns_to_the_identical_store(labelled):
    clean, clean_run_dir, storage = labelled  # what the killed and rerun store must equal, on the same backend
    cfg = _run_config(f"{clean_run_dir}-killed", storage, *STORE)  # a sibling run, once per backend
    _make_teacher(cfg)
    layout = RunLayout(cfg.run.run_dir)
    killed: list[int] = []
    stop = threading.Event()
    condition = lambda: _commits(layout.soft_labels, storage) >= 3  # noqa: E731
    killer = threading.Thread(target=kill_train_worker_when, args=(condition, killed, stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(Exception):
            precompute.run(cfg)  # max_failures=0: the killed worker fails the run
    finally:
        stop.set()
        killer.join()
    assert killed, "no precompute worker was killed"
    with pytest.raises(store.SoftLabelError):
        store.load_store_manifest(layout.soft_labels, storage)  # no manifest: the store is not committed
    precompute.run(cfg)  # the re-run skips committed shards
    rerun_manifest, rerun_tables = _read_store(layout.soft_labels, storage)

    # The uninterrupted run of the same dataset and teacher.
    clean_manifest, clean_tables = _read_store(RunLayout(clean.run.run_dir).soft_labels, storage)

    assert rerun_manifest["num_positions"] == clean_manifest["num_positions"]
    assert [s["sha256"] for s in rerun_manifest["shards"]] == [s["sha256"] for s in clean_manifest["shards"]]
    for a, b in zip(rerun_tables, clean_tables):
        assert a.equals(b)
    examples = np.concatenate([t.column("example_start").to_numpy() for t in rerun_tables])
    assert len(np.unique(examples)) == len(examples) == rerun_manifest["num_sequences"]


def test_a_rerun_on_a_finished_store_keeps_it_as_written(labelled, capsys):
    """Nothing left to label: the store's manifest, with the time its labelling took, is not rewritten."""
    cfg, run_dir, storage = labelled
    layout = RunLayout(run_dir)
    manifest = fsio.read_json(fsio.join(layout.soft_labels, store.MANIFEST), storage)
    # The plan knows the store is this teacher's (the teacher is given, not to be trained): no Ray run at all.
    given = _run_config(run_dir, storage, *STORE, f"teacher.checkpoint={layout.teacher}")
    assert precompute.run(given) == manifest
    assert "precompute: done; the store at" in capsys.readouterr().out
    assert fsio.read_json(fsio.join(layout.soft_labels, store.MANIFEST), storage) == manifest
    if not storage:  # a teacher the plan cannot call done: the workers find every shard committed and keep the manifest
        precompute.run(cfg)
        assert fsio.read_json(fsio.join(layout.soft_labels, store.MANIFEST), storage) == manifest


def test_inspect_and_readers_report_bad_stores(labelled, capsys):
    cfg, run_dir, storage = labelled
    url = RunLayout(cfg.run.run_dir).soft_labels
    fs, root = fsio.get_fs(url, storage)
    overrides = [f"run.run_dir={run_dir}"] + ([f"data.storage_options={json.dumps(storage)}"] if storage else [])
    assert cli_main(["inspect", url, *overrides]) == 0
    assert "verified" in capsys.readouterr().out

    manifest = store.load_store_manifest(url, storage)
    # A manifest from another teacher is refused by readers expecting this run's teacher...
    with pytest.raises(store.SoftLabelError, match="teacher"):
        store.load_store_manifest(url, storage, expect_teacher="0" * 64)
    # ...and by inspect, given a run whose teacher is another one.
    other_teacher = f"{run_dir}-other-teacher"
    model = SequentialRecommender(cfg.teacher.model, manifest["num_items"])
    save_model(other_teacher, model.state_dict(), cfg.teacher.model, manifest["num_items"], {}, storage)
    assert cli_main(["inspect", url, *overrides, f"teacher.checkpoint={other_teacher}"]) == 2
    assert "teacher" in capsys.readouterr().err

    # Damage a copy of the store (the original is shared with other tests): inspect is given the copy's URL.
    url = f"{url.rstrip('/')}-damaged"
    copy_root = f"{root.rstrip('/')}-damaged"
    fs.copy(root, copy_root, recursive=True)
    assert cli_main(["inspect", url, *overrides]) == 0  # the intact copy verifies
    capsys.readouterr()
    root = copy_root
    first = f"{root}/{manifest['shards'][0]['file']}"
    second = f"{root}/{manifest['shards'][1]['file']}"
    data = fs.cat_file(first)
    fs.pipe_file(first, data[: len(data) // 2])  # truncated shard
    fs.rm_file(second)  # missing shard
    assert cli_main(["inspect", url, *overrides]) == 2
    err = capsys.readouterr().err
    assert manifest["shards"][0]["file"] in err and manifest["shards"][1]["file"] in err
    with pytest.raises(store.SoftLabelError, match=manifest["shards"][0]["file"]):
        store.read_shard(url, manifest, manifest["shards"][0]["index"], storage)
    with pytest.raises(store.SoftLabelError, match=manifest["shards"][1]["file"]):
        store.read_shard(url, manifest, manifest["shards"][1]["index"], storage)


def test_an_ensemble_labels_with_the_mixture_of_its_teachers(ray_session, tmp_path):
    from data_pipeline.exports import ensemble_fingerprint, read_export_meta
    from distill.ensemble import ensemble_log_probs

    cfg = _run_config(str(tmp_path / "run"), {})
    _make_teacher(cfg)
    layout = RunLayout(cfg.run.run_dir)
    member = str(tmp_path / "second-teacher")
    member_fp = export_spread_teacher(member, cfg, load_manifest(layout.data), seed=5)
    cfg = _run_config(str(tmp_path / "run"), {}, f"teacher.ensemble=[{member}]")
    precompute.run(cfg)
    manifest, tables = _read_store(layout.soft_labels, {})
    first, _ = load_model(layout.teacher)
    first_fp = read_export_meta(layout.teacher)["fingerprint"]
    assert manifest["teacher_fingerprint"] == ensemble_fingerprint([first_fp, member_fp])
    assert [m["fingerprint"] for m in manifest["extra"]["ensemble"]] == [first_fp, member_fp]
    spec = store.manifest_spec(manifest)
    decoded = store.decode_positions(tables[0], spec)
    second, _ = load_model(member)
    for row, seq in enumerate(tables[0].column("inputs").to_pylist()[:4]):
        x = torch.tensor([seq])
        with torch.no_grad():
            mixed = ensemble_log_probs([first.scores(first(x)), second.scores(second(x))])[0, :, 1:]
        values, columns = mixed.topk(spec.k, dim=-1)
        a, b = decoded["row_offsets"][row : row + 2].tolist()
        assert torch.equal(decoded["topk_ids"][a:b], columns + 1)
        assert torch.all((decoded["topk_logits"][a:b] - values).abs() <= values.abs() * 2.0**-10 + 1e-4)
        assert torch.allclose(decoded["lse"][a:b], torch.zeros(b - a), atol=1e-4)  # a mixture's log-probabilities
