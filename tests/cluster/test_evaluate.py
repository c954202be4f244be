"""``recdistill evaluate`` and the report on a small prepared dataset and exported models (no Ray)."""

from __future__ import annotations

import pytest
import torch

from cluster import evaluate, report
from conftest import small_config
from data_pipeline.dataset import prepare_dataset
from data_pipeline.layout import RunLayout
from data_pipeline.exports import ExportError
from cluster.models import save_model
from distill.model import SequentialRecommender


def _export(folder: str, model_cfg, num_items: int, dataset_fingerprint: str, seed: int) -> str:
    torch.manual_seed(seed)
    model = SequentialRecommender(model_cfg, num_items)
    return save_model(folder, model.state_dict(), model_cfg, num_items, {"dataset_fingerprint": dataset_fingerprint})


def _run_with_models(tmp_path, *names: str):
    """A prepared small run with random exports of ``names`` (teacher, student, baseline): (cfg, layout, dataset)."""
    cfg = small_config(tmp_path / "run")
    layout = RunLayout(cfg.run.run_dir)
    dataset = prepare_dataset(cfg.data, layout.data, seed=0)
    n, fp = dataset["num_items"], dataset["fingerprint"]
    for seed, name in enumerate(names):
        _export(getattr(layout, name), cfg.teacher.model if name == "teacher" else cfg.student.model, n, fp, seed=seed)
    return cfg, layout, dataset


def test_a_teacher_given_by_teacher_checkpoint_is_evaluated_and_reported(tmp_path):
    # A teacher trained once, elsewhere, and reused by this run (teacher.checkpoint): the
    # report must score it, not only a teacher in this run's own folder.
    external = str(tmp_path / "shared-teacher")
    cfg = small_config(tmp_path / "run", f"teacher.checkpoint={external}")
    layout = RunLayout(cfg.run.run_dir)
    dataset = prepare_dataset(cfg.data, layout.data, seed=0)
    n, fp = dataset["num_items"], dataset["fingerprint"]
    teacher_fp = _export(external, cfg.teacher.model, n, fp, seed=0)
    student_fp = _export(layout.student, cfg.student.model, n, fp, seed=1)

    models = evaluate.run(cfg)["models"]

    assert set(models) == {"popularity", "teacher", "student_kd"}
    assert (models["teacher"]["fingerprint"], models["student_kd"]["fingerprint"]) == (teacher_fp, student_fp)
    line = report.run(cfg)
    assert line.startswith("student keeps") and "of teacher NDCG@10" in line


def test_the_report_gives_the_gain_with_its_interval_the_runs_context_stage_times_and_the_frontier(tmp_path):
    import json

    cfg, layout, dataset = _run_with_models(tmp_path, "teacher", "student", "baseline")
    n = dataset["num_items"]
    metrics = evaluate.run(cfg)
    gain = metrics["gains"]["student_kd_over_baseline"]
    assert gain["ci95_low"] <= gain["gain"] <= gain["ci95_high"] and gain["users"] == sum(dataset["splits"]["test"]["rows"])
    # Every model by the popularity band of the test target: each test user in one band, the bands make the whole.
    for name, scores in metrics["models"].items():
        bands = scores["by_target_popularity"]
        assert sum(b["users"] for b in bands) == gain["users"], name
        assert sum(b["mean"] * b["users"] for b in bands) / gain["users"] == pytest.approx(scores["ndcg@10"], rel=1e-5), name
    assert metrics["code"]["commit"] != ""
    (tmp_path / "run" / "report").mkdir(exist_ok=True)
    (tmp_path / "run" / "report" / "timings.json").write_text(json.dumps({"prepare": 1.5, "train-teacher": 30.25}))
    frontier = {"metric": "NDCG@10", "users": 9, "teacher": {"params": 100, "ndcg@10": 0.4}, "rows": [
        {"member": "1in10-s0-kd", "teacher_share": 0.1, "params": 10, "kd_ndcg@10": 0.3, "kd_keeps_of_teacher": 0.75,
         "kd_latency_ms_per_request": 0.01}]}
    (tmp_path / "run" / "sweep").mkdir()
    (tmp_path / "run" / "sweep" / "frontier.json").write_text(json.dumps(frontier))
    line = report.run(cfg)
    assert f"over baseline (95% CI {100 * gain['ci95_low']:+.1f}% .. {100 * gain['ci95_high']:+.1f}%)" in line
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert f"{dataset['num_users']:,} users, {n:,} items, {dataset['num_interactions']:,} interactions" in text
    assert "loss `kl_topk_tail`, alpha 0.2" in text and "[config.yaml](../config.yaml)" in text
    assert "| prepare | 1.5 s |\n| train-teacher | 30.2 s |\n| total | 31.8 s |" in text  # in pipeline order
    assert "## Sweep frontier" in text and "| 1in10-s0-kd | 10.0% |" in text
    head = metrics["models"]["teacher"]["by_target_popularity"][0]
    teacher_row = next(row for row in text.splitlines() if row.startswith("| teacher | ") and row.count("|") == 5)
    assert f"{head['band']} ({head['users']:,} users)" in text and f" {head['mean']:.4f} " in teacher_row


def test_a_teacher_ensemble_is_scored_as_the_mixture_and_is_the_teacher_of_the_verdict(tmp_path):
    from cluster.models import load_scorers, mixture_scorer
    from data_pipeline.dataset import read_split
    from distill.evaluate import evaluate_split

    member = str(tmp_path / "second-teacher")
    cfg, layout, dataset = _run_with_models(tmp_path, "teacher", "student")
    cfg = small_config(tmp_path / "run", f"teacher.ensemble=[{member}]")
    _export(member, cfg.teacher.model, dataset["num_items"], dataset["fingerprint"], seed=7)
    models = evaluate.run(cfg)["models"]
    ens = models["teacher_ensemble"]
    assert ens["members"] == 2 and ens["params"] == 2 * models["teacher"]["params"]
    # The same numbers as the mixture scored directly, and not the first teacher's alone.
    mixture = mixture_scorer(load_scorers([layout.teacher, member], dataset)[0])
    test = read_split(layout.data, "test", None, dataset)
    direct = evaluate_split(mixture, test, dataset["num_items"], cfg.eval.ks, cfg.eval.batch_size, "cpu")
    assert ens["ndcg@10"] == direct["ndcg@10"] and ens["ndcg@10"] != models["teacher"]["ndcg@10"]
    assert "of teacher ensemble NDCG@10" in report.run(cfg)


def test_a_model_trained_on_another_dataset_is_refused_by_name(tmp_path):
    cfg = small_config(tmp_path / "run")
    layout = RunLayout(cfg.run.run_dir)
    dataset = prepare_dataset(cfg.data, layout.data, seed=0)
    _export(layout.teacher, cfg.teacher.model, dataset["num_items"], dataset["fingerprint"], seed=0)
    _export(layout.baseline, cfg.student.model, dataset["num_items"], "0" * 64, seed=1)
    with pytest.raises(ExportError, match=f"{layout.baseline} was trained on dataset 000000000000"):
        evaluate.run(cfg)


def _flip_a_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor: the file still parses, only the fingerprint can tell
    path.write_bytes(bytes(data))


def test_a_damaged_export_is_named_not_dropped_and_the_report_says_so(tmp_path, capsys):
    cfg, layout, dataset = _run_with_models(tmp_path, "teacher", "student")
    _flip_a_bit(tmp_path / "run" / "student" / "model.safetensors")

    with pytest.raises(evaluate.DamagedExports, match=f"export {layout.student} is damaged") as err:
        evaluate.run(cfg)
    metrics = err.value.report
    assert set(metrics["models"]) == {"popularity", "teacher"}  # the intact ones were still scored
    assert metrics["unavailable"]["student_kd"].startswith("damaged")
    assert metrics["unavailable"]["student_baseline"] == "not trained yet"
    line = report.run(cfg)
    assert "distilled student export is damaged" in line and "not trained yet" not in line
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "distilled student: not scored, damaged" in text and "baseline student: not scored, not trained yet" in text


def test_the_cli_fails_on_a_damaged_export_and_a_missing_one_is_only_not_trained(tmp_path, capsys):
    from cluster.cli import main

    cfg = small_config(tmp_path / "run")
    layout = RunLayout(cfg.run.run_dir)
    dataset = prepare_dataset(cfg.data, layout.data, seed=0)
    _export(layout.teacher, cfg.teacher.model, dataset["num_items"], dataset["fingerprint"], seed=0)
    argv = ["evaluate", "--config", str(tmp_path / "cfg.yaml")]
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    assert main(argv) == 0
    assert report.run(cfg) == "no verdict yet: the distilled student is not trained yet"
    _flip_a_bit(tmp_path / "run" / "teacher" / "model.safetensors")
    assert main(argv) == 2
    assert f"export {layout.teacher} is damaged" in capsys.readouterr().err
