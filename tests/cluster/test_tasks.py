"""The training task a run names (run.task): what each recipe builds, batches and selects on."""

import pytest
import torch

from cluster.tasks import training_task
from distill.config import ModelConfig
from distill.model import SequentialRecommender
from distill.rating_model import RatingModel

CFG = ModelConfig(d_model=8, num_layers=1, num_heads=1, ffn_dim=16, max_len=6)


def test_each_task_builds_its_model_and_selects_on_its_metric():
    next_item = training_task("next_item", {"num_items": 30})
    assert isinstance(next_item.build(CFG, {"num_items": 30}), SequentialRecommender)
    assert next_item.select({"ndcg@10": 0.2}) > next_item.select({"ndcg@10": 0.1})
    rating = training_task("rating", {"num_items": 30, "task": "rating", "rating_values": [1, 2, 3]})
    model = rating.build(CFG, {"num_items": 30, "rating_values": [1, 2, 3]})
    assert isinstance(model, RatingModel) and model.num_levels == 3
    assert rating.select({"nll": 1.0}) > rating.select({"nll": 1.2})  # lower NLL is better
    items, levels = rating.empty_batch(CFG.max_len)
    loss, count = rating.objective(model)(items, levels)  # a rank's empty step: no example, a finite zero
    assert float(count) == 0 and float(loss) == 0


def test_a_dataset_prepared_for_another_task_is_refused_by_name():
    with pytest.raises(ValueError, match="prepared for the next_item task, and this run's run.task is rating"):
        training_task("rating", {"num_items": 30})
    with pytest.raises(ValueError, match="unknown task 'stars'; valid tasks: next_item, rating"):
        training_task("stars")
