"""`recdistill serve` on a real local Ray cluster, spoken to over real HTTP on loopback."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from cluster.ray_setup import free_port
from cluster.serving import FINGERPRINT_HEADER
from conftest import export_spread_teacher, small_config
from data_pipeline.dataset import prepare_dataset, read_item_ids, read_split
from data_pipeline.layout import RunLayout
from distill.evaluate import left_pad_list_array
from tests.cluster.test_serving import offline_top_k

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """The run's distilled student served by `recdistill serve` (not blocking), with batches of at most 4."""
    from ray import serve

    from cluster import serve as serve_stage

    port = free_port()
    cfg = small_config(tmp_path_factory.mktemp("serve"), f"serve.port={port}", "serve.max_batch_size=4",
                       "serve.batch_wait_timeout_s=0.05", "serve.cpus_per_replica=0.5", "serve.max_k=20")
    layout = RunLayout(cfg.run.run_dir)
    manifest = prepare_dataset(cfg.data, layout.data, seed=0)
    fingerprint = export_spread_teacher(layout.student, cfg, manifest, seed=3)
    plan = serve_stage.run(cfg, block=False)
    try:
        yield cfg, layout, f"http://127.0.0.1:{port}/recommend", fingerprint, plan
    finally:
        serve.shutdown()


def post(url, body):
    return requests.post(url, data=body if isinstance(body, (bytes, str)) else json.dumps(body), timeout=60)


def test_top_k_over_http_is_the_offline_ranking(served):
    cfg, layout, url, fingerprint, plan = served
    test = read_split(layout.data, "test").slice(0, 12)
    raw = read_item_ids(layout.data)
    items, values = offline_top_k(layout, torch.from_numpy(left_pad_list_array(test.column("history"))), 10)
    for history, want_items, want_values in zip(test.column("history").to_pylist(), items.tolist(), values.tolist()):
        reply = post(url, {"history": [raw[i - 1] for i in history], "k": 10})
        assert reply.status_code == 200, reply.text
        assert reply.headers[FINGERPRINT_HEADER] == fingerprint
        body = reply.json()
        assert body["items"] == [raw[i - 1] for i in want_items] and body["model"] == "student_kd"
        assert body["scores"] == pytest.approx(want_values, rel=1e-5, abs=1e-5)
    info = requests.get(url, timeout=30).json()
    assert info["fingerprint"] == fingerprint and info["num_items"] == len(raw) and info["max_k"] == 20


def test_bad_requests_get_4xx_with_messages_and_the_replica_keeps_serving(served):
    cfg, layout, url, fingerprint, plan = served
    for body, status, message in [(b"{oops", 400, "not valid JSON"), ({"history": [], "k": 21}, 422, "k must be between 1 and 20"),
                                  ({"history": [], "k": -1}, 422, "k must be between"), ({"hist": []}, 422, "hist"),
                                  (b'"just a string"', 400, "JSON object")]:
        reply = post(url, body)
        assert reply.status_code == status and message in reply.json()["error"], (body, reply.status_code, reply.text)
        assert reply.headers[FINGERPRINT_HEADER] == fingerprint
    assert requests.put(url, data=b"{}", timeout=30).status_code == 405
    huge = b'{"history": [' + b'"1",' * 400_000 + b'"1"], "k": 3}'  # 1.6 MB: over 64 bytes x max_history, refused unread
    reply = post(url, huge)
    assert reply.status_code == 413 and "at most 1,284,096 are accepted" in reply.json()["error"], reply.text
    reply = post(url, {"history": ["unknown-id"], "k": 3})
    assert reply.status_code == 200 and reply.json()["unknown_items"] == 1 and reply.json()["ranking"] == "popularity"


def test_a_burst_larger_than_the_batch_is_served_completely(served):
    cfg, layout, url, fingerprint, plan = served
    raw = read_item_ids(layout.data)
    histories = [[raw[(i * 7 + j) % len(raw)] for j in range(1 + i % 9)] for i in range(48)]  # 12 batches of 4
    alone = [post(url, {"history": h, "k": 5}).json()["items"] for h in histories[:6]]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda h: post(url, {"history": h, "k": 5}), histories))
    assert [r.status_code for r in replies] == [200] * 48
    assert [r.json()["items"] for r in replies[:6]] == alone  # batched with others, the same answer
    assert all(len(r.json()["items"]) == 5 for r in replies)
