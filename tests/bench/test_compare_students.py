"""bench.compare_students.compare on a small prepared dataset and exported models (no Ray)."""

from __future__ import annotations

import pytest
import torch

from bench.compare_students import compare
from conftest import small_config
from data_pipeline.dataset import load_manifest, prepare_dataset, read_split
from data_pipeline.layout import RunLayout
from distill.evaluate import evaluate_split, model_scorer
from cluster.models import save_model
from distill.model import SequentialRecommender


@pytest.fixture
def run(tmp_path):
    cfg = small_config(tmp_path / "run")
    layout = RunLayout(cfg.run.run_dir)
    dataset = prepare_dataset(cfg.data, layout.data, seed=0)
    return cfg, layout, dataset


def export(folder: str, cfg, num_items: int, seed: int, dataset_fingerprint: str) -> SequentialRecommender:
    torch.manual_seed(seed)
    model = SequentialRecommender(cfg.student.model, num_items).eval()
    save_model(folder, model.state_dict(), cfg.student.model, num_items,
                {"role": "student", "dataset_fingerprint": dataset_fingerprint})
    return model


def test_scores_every_model_on_the_test_users_and_gains_over_the_reference(run, tmp_path):
    cfg, layout, dataset = run
    n, fp = dataset["num_items"], dataset["fingerprint"]
    models = {name: export(str(tmp_path / name), cfg, n, seed, fp) for name, seed in (("ref", 0), ("other", 1))}
    ref, other, same = str(tmp_path / "ref"), str(tmp_path / "other"), str(tmp_path / "ref_again")
    export(same, cfg, n, 0, fp)  # the reference's weights under another name

    out = compare(cfg, ref, [other, same])

    test = read_split(layout.data, "test", None, load_manifest(layout.data))
    assert out["users"] == test.num_rows == dataset["num_users"]
    # Each model's NDCG@10 is the evaluator's seen-filtered headline number.
    for name, folder in (("ref", ref), ("other", other)):
        expected = evaluate_split(model_scorer(models[name], cfg.student.model.max_len), test, n)["ndcg@10"]
        assert out["models"][folder]["ndcg@10"] == pytest.approx(expected, rel=1e-6)
    gain = out["models"][other]["over_reference"]
    assert gain["gain"] == pytest.approx(out["models"][other]["ndcg@10"] / out["models"][ref]["ndcg@10"] - 1)
    assert gain["ci95_low"] <= gain["gain"] <= gain["ci95_high"] and gain["users"] == test.num_rows
    # Identical weights: no gain, and no spread in the paired bootstrap.
    assert out["models"][same]["over_reference"]["gain"] == 0.0
    assert out["models"][same]["over_reference"]["ci95_low"] == out["models"][same]["over_reference"]["ci95_high"] == 0.0


def test_a_model_trained_on_another_dataset_is_refused(run, tmp_path):
    cfg, _, dataset = run
    ref, stranger = str(tmp_path / "ref"), str(tmp_path / "stranger")
    export(ref, cfg, dataset["num_items"], 0, dataset["fingerprint"])
    export(stranger, cfg, dataset["num_items"], 1, "0" * 64)
    with pytest.raises(ValueError, match="stranger was trained on dataset"):
        compare(cfg, ref, [stranger])
