"""ServedModel (what one replica holds), without Ray: its answers are the offline evaluation's ranking."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.config import ConfigError
from cluster.models import load_model
from cluster.serve import plan_serving, serve_config
from cluster.serving import BadRequest, ServedModel
from conftest import export_spread_teacher, small_config
from data_pipeline.dataset import prepare_dataset, read_item_ids, read_split, train_item_counts
from data_pipeline.exports import ExportError, ExportMissing
from data_pipeline.layout import RunLayout
from distill.evaluate import left_pad_list_array, model_scorer
from distill.metrics import seen_mask


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """A prepared tiny dataset and a (random, well-spread) model exported as the run's distilled student."""
    cfg = small_config(tmp_path_factory.mktemp("serving"))
    layout = RunLayout(cfg.run.run_dir)
    manifest = prepare_dataset(cfg.data, layout.data, seed=0)
    export_spread_teacher(layout.student, cfg, manifest, seed=3)
    return cfg, layout, manifest


def offline_top_k(layout, histories_dense, k):
    """The offline path: model_scorer on left-padded dense histories, seen items masked, sorted."""
    model, meta = load_model(layout.student)
    scorer = model_scorer(model, meta["model"]["max_len"])
    with torch.no_grad():
        scores = scorer(histories_dense).float()
    scores[:, 0] = float("-inf")
    scores = scores.masked_fill(seen_mask(histories_dense, scores.shape[1]), float("-inf"))
    values, items = torch.sort(scores, dim=1, descending=True, stable=True)
    return items[:, :k], values[:, :k]


def test_answers_are_the_offline_ranking_in_original_ids(served_run):
    cfg, layout, manifest = served_run
    served = ServedModel(layout.student, layout.data)
    test = read_split(layout.data, "test").slice(0, 20)
    raw = read_item_ids(layout.data)
    requests = [served.parse(json.dumps({"history": [raw[i - 1] for i in h], "k": 7}).encode())
                for h in test.column("history").to_pylist()]
    answers = served.recommend(requests)
    items, values = offline_top_k(layout, torch.from_numpy(left_pad_list_array(test.column("history"))), 7)
    for answer, want_items, want_values in zip(answers, items.tolist(), values.tolist()):
        assert answer["items"] == [raw[i - 1] for i in want_items]
        assert answer["scores"] == pytest.approx(want_values, rel=1e-5, abs=1e-5)
        assert answer["ranking"] == "model" and answer["unknown_items"] == 0
    # One request alone gets the same answer as inside a batch (padding to the batch's longest history changes nothing).
    alone = served.recommend([requests[3]])[0]
    assert alone["items"] == answers[3]["items"] and alone["scores"] == pytest.approx(answers[3]["scores"], rel=1e-5)


def test_unknown_ids_are_counted_empty_histories_get_popularity_and_seen_items_can_stay(served_run):
    cfg, layout, manifest = served_run
    served = ServedModel(layout.student, layout.data)
    raw = read_item_ids(layout.data)
    history = [raw[0], "no-such-item", raw[1], 10**9]
    with_unknown, known_only, empty, unknown_only, unfiltered = served.recommend([
        served.parse(json.dumps({"history": history, "k": 5}).encode()),
        served.parse(json.dumps({"history": [raw[0], raw[1]], "k": 5}).encode()),
        served.parse(b'{"k": 4}'),
        served.parse(b'{"history": ["nope"], "k": 4}'),
        served.parse(json.dumps({"history": [raw[0], raw[1]], "k": len(raw), "filter_seen": False}).encode()),
    ])
    assert with_unknown["unknown_items"] == 2 and with_unknown["items"] == known_only["items"]
    counts = train_item_counts(layout.data, manifest["num_items"])
    by_popularity = sorted(range(1, len(counts)), key=lambda i: (-counts[i], i))[:4]
    assert empty["ranking"] == "popularity" and empty["items"] == [raw[i - 1] for i in by_popularity]
    assert unknown_only["ranking"] == "popularity" and unknown_only["unknown_items"] == 1
    assert raw[0] not in known_only["items"] and {raw[0], raw[1]} <= set(unfiltered["items"])


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"history": [], "k": 0}', 422, "k must be between 1 and"),
    (b'{"history": [], "k": 100000}', 422, "k must be between 1 and"),
    (b'{"history": [], "k": "ten"}', 422, "k:"),
    (b'{"history": [1.5], "k": 3}', 422, "history.0"),
    (b'{"history": [], "kk": 3}', 422, "kk: Extra inputs"),
    (b'{"history": "1,2,3"}', 422, "history"),
    (b'{"history": [], "filter_seen": "no"}', 422, "filter_seen"),  # not read as a truthy string
    (b'{"history":' + b"[" * 2000 + b"]" * 2000 + b"}", 400, "nested too deeply"),  # json's RecursionError
    (b'{"history": [' + b'"123456",' * 600 + b'"1"]}', 413, "at most 4,416 are accepted"),  # 64 bytes an item + 4 KiB
])
def test_bad_requests_are_refused_with_a_message(served_run, body, status, message):
    cfg, layout, manifest = served_run
    served = ServedModel(layout.student, layout.data, max_history=5)
    with pytest.raises(BadRequest, match=message) as caught:
        served.parse(body)
    assert caught.value.status == status
    with pytest.raises(BadRequest, match="at most 5"):
        served.parse(b'{"history": [1, 2, 3, 4, 5, 6]}')
    with pytest.raises(BadRequest, match="history has 6 items; at most 5") as caught:  # counted before its entries are checked
        served.parse(b'{"history": [1, 2, 3, 4, 5, [6]]}')
    assert caught.value.status == 422


def test_the_plan_refuses_a_missing_export_or_another_datasets_before_anything_starts(served_run, tmp_path):
    cfg, layout, manifest = served_run
    with pytest.raises(ExportMissing, match="no exported model at .*baseline"):
        plan_serving(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": "student_baseline"})}))
    with pytest.raises(ConfigError, match="serve.model: 'studnet_kd' is neither one of teacher, student_kd"):
        plan_serving(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": "studnet_kd"})}))
    other = small_config(tmp_path, "data.synthetic.num_users=300")
    other_manifest = prepare_dataset(other.data, RunLayout(other.run.run_dir).data, seed=1)
    export_spread_teacher(str(tmp_path / "elsewhere"), other, other_manifest, seed=0)
    with pytest.raises(ExportError, match="was trained on dataset"):
        plan_serving(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": str(tmp_path / "elsewhere")})}))


def test_the_serve_config_file_is_one_ray_serve_accepts_and_holds_no_credentials(served_run):
    from ray.serve.schema import ServeDeploySchema

    cfg, layout, manifest = served_run
    cfg = small_config(cfg.run.run_dir, "data.storage_options={key: AKIA-SECRET, anon: false}",
                       "serve.autoscaling={min_replicas: 1, max_replicas: 3}")
    plan = plan_serving(cfg, cluster_gpus=0)
    tree = serve_config(cfg, plan)
    schema = ServeDeploySchema.model_validate(tree)
    app = schema.applications[0]
    assert app.import_path == "cluster.serve:build_app" and app.route_prefix == "/recommend"
    assert app.deployments[0].autoscaling_config["max_replicas"] == 3
    assert app.deployments[0].ray_actor_options.num_gpus == 0 and plan.app_args["device"] == "cpu"
    assert "AKIA" not in json.dumps(tree) and plan.app_args["storage_options"] == {"anon": False}
    assert plan_serving(cfg, cluster_gpus=4).app_args["device"] == "cuda"  # GPUs on the cluster: replicas use one each


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
def test_a_model_served_on_cuda_answers_as_on_cpu(served_run):
    cfg, layout, manifest = served_run
    raw = read_item_ids(layout.data)
    requests = [json.dumps({"history": [raw[(i * 5 + j) % len(raw)] for j in range(1 + i % 7)], "k": 10}).encode() for i in range(40)]
    cpu, cuda = ServedModel(layout.student, layout.data), ServedModel(layout.student, layout.data, device="cuda")
    assert cuda.info()["device"].startswith("cuda")
    for a, b in zip(cpu.recommend([cpu.parse(r) for r in requests]), cuda.recommend([cuda.parse(r) for r in requests])):
        assert a["items"] == b["items"] and a["scores"] == pytest.approx(b["scores"], rel=1e-3, abs=1e-3)
