"""Parameter counts: closed formula == meta-device build == real build; the 1B config is >= 1e9."""

from pathlib import Path

import pytest
import torch

from cluster.config import load_config

from distill.config import ModelConfig
from distill.model import SequentialRecommender
from distill.sizing import count_parameters, count_parameters_meta

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ML1M_NUM_ITEMS = 3416


@pytest.mark.parametrize("tied", [True, False])
def test_formula_matches_meta_and_real_model(tied):
    cfg = ModelConfig(d_model=12, num_layers=3, num_heads=3, ffn_dim=20, max_len=7, tied_embeddings=tied)
    real = sum(p.numel() for p in SequentialRecommender(cfg, 17).parameters())
    assert count_parameters(cfg, 17) == count_parameters_meta(cfg, 17) == real


@pytest.mark.parametrize("num_items", [17, 9, 4])
def test_formula_matches_meta_and_real_model_with_mixed_dims(num_items):
    cfg = ModelConfig(d_model=12, num_layers=1, num_heads=3, ffn_dim=20, max_len=7,
                      item_dims=[{"items": 5, "dim": 12}, {"items": 6, "dim": 6}, {"dim": 2}])
    real = sum(p.numel() for p in SequentialRecommender(cfg, num_items).parameters())
    assert count_parameters(cfg, num_items) == count_parameters_meta(cfg, num_items) == real


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = SequentialRecommender(ModelConfig(d_model=64, num_layers=1, num_heads=2, ffn_dim=64), 100)
    assert all(p.is_meta for p in model.parameters())


def test_teacher_1b_config_has_a_billion_parameters():
    cfg = load_config(CONFIGS / "teacher-1b.yaml")
    model_cfg = cfg.teacher.model
    n = count_parameters(model_cfg, ML1M_NUM_ITEMS)
    assert n >= 1.0e9
    assert count_parameters_meta(model_cfg, ML1M_NUM_ITEMS) == n
    assert cfg.scaling.num_workers == 8
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.data.format == "sasrec"


def test_ml1m_student_has_at_most_a_tenth_of_the_teachers_parameters():
    cfg = load_config(CONFIGS / "ml1m.yaml")
    student, teacher = count_parameters(cfg.student.model, ML1M_NUM_ITEMS), count_parameters(cfg.teacher.model, ML1M_NUM_ITEMS)
    assert student * 10 <= teacher, (student, teacher)


@pytest.mark.parametrize("budget", [3_000, 20_000, 150_000, 1_000_000])
def test_fit_to_budget_is_the_widest_model_within_the_budget(budget):
    from distill.sizing import fit_to_budget

    template = ModelConfig(d_model=64, num_layers=2, num_heads=2, ffn_dim=256, max_len=50)
    fitted = fit_to_budget(template, 500, budget)
    assert count_parameters(fitted, 500) <= budget
    wider = ModelConfig.model_validate({**fitted.model_dump(), "d_model": fitted.d_model + 2, "ffn_dim": 4 * (fitted.d_model + 2)})
    assert count_parameters(wider, 500) > budget  # one step wider no longer fits
    assert (fitted.num_layers, fitted.num_heads, fitted.max_len, fitted.ffn_dim) == (2, 2, 50, 4 * fitted.d_model)
    assert count_parameters_meta(fitted, 500) == count_parameters(fitted, 500)


def test_fit_to_budget_scales_item_bands_and_refuses_an_impossible_budget():
    from distill.config import ItemDimBand
    from distill.sizing import fit_to_budget

    template = ModelConfig(d_model=64, num_layers=1, num_heads=1, ffn_dim=128,
                           item_dims=[ItemDimBand(items=100, dim=64), ItemDimBand(dim=16)])
    fitted = fit_to_budget(template, 5_000, 60_000)
    assert [b.items for b in fitted.item_dims] == [100, None]
    assert fitted.item_dims[0].dim == fitted.d_model and fitted.item_dims[1].dim == max(1, round(16 * fitted.d_model / 64))
    assert count_parameters(fitted, 5_000) <= 60_000
    with pytest.raises(ValueError, match="no model like the template fits 1,000 parameters over 5,000 items"):
        fit_to_budget(ModelConfig(d_model=64, num_layers=1, num_heads=1, ffn_dim=128), 5_000, 1_000)
