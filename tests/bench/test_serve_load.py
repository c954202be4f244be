"""bench.serve_load: its summary rule, and one short real run (both models served by Ray Serve, real HTTP load)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.serve_load import requests_per_level, sustainable


def level(concurrency, rps, p99, errors=None):
    return {"concurrency": concurrency, "rps": rps, "p99_ms": p99, "errors": errors or {}}


def test_the_sustainable_load_is_the_fastest_level_within_the_bound_and_without_errors():
    levels = [level(1, 50, 20), level(4, 150, 60), level(16, 300, 140), level(8, 200, 90, {"503": 1})]
    assert sustainable(levels, 100)["concurrency"] == 4
    assert sustainable(levels, 200)["concurrency"] == 16
    assert sustainable(levels, 10) is None
    assert requests_per_level(1, 200) == 200 and requests_per_level(64, 200) == 1600


def _short_run(tmp_path):
    """A short bench.serve_load run on tiny exports (a random teacher and a smaller random student); returns its result."""
    from bench import serve_load
    from conftest import ROOT, SMALL_RUN, export_spread_teacher, small_config
    from data_pipeline.dataset import prepare_dataset
    from data_pipeline.layout import RunLayout

    cfg = small_config(tmp_path / "run")
    layout = RunLayout(cfg.run.run_dir)
    manifest = prepare_dataset(cfg.data, layout.data, seed=0)
    export_spread_teacher(layout.teacher, cfg, manifest, seed=0)
    student_cfg = small_config(tmp_path / "run", "teacher.model.d_model=8", "teacher.model.ffn_dim=16")
    export_spread_teacher(layout.student, student_cfg, manifest, seed=1)  # a smaller model as the student
    rc = serve_load.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--name", "t", "--student", layout.student,
                          "--levels", "1,4", "--min-requests", "30", "--p99-ms", "5000", "--results-dir", str(tmp_path / "out"),
                          "--report", f"run.run_dir={cfg.run.run_dir}", *SMALL_RUN, "serve.cpus_per_replica=0.5"])
    assert rc == 0
    return cfg, json.loads((tmp_path / "out" / "serve_load_t.json").read_text())


@pytest.mark.integration
def test_a_short_run_serves_both_models_and_writes_its_result(ray_session, tmp_path):
    cfg, result = _short_run(tmp_path)
    assert (tmp_path / "out" / "serve_load_t.png").stat().st_size > 1000
    assert result["params_ratio"] > 1
    for name in ("student", "teacher"):
        entry = result["models"][name]
        assert [lv["concurrency"] for lv in entry["levels"]] == [1, 4]
        assert all(lv["ok"] == lv["requests"] and lv["rps"] > 0 and lv["p50_ms"] <= lv["p99_ms"] for lv in entry["levels"])
        assert entry["sustainable"] is not None
    assert result["throughput_ratio_at_p99_bound"] > 0 and result["ceiling"][0]["ok"] > 0
    assert json.loads((tmp_path / "run" / "report" / "serve_load.json").read_text())["name"] == "t"

    # The run's report puts size, latency under load and quality on one page.
    from cluster import evaluate, report

    evaluate.run(cfg)
    report.run(cfg)
    page = (tmp_path / "run" / "report" / "report.md").read_text()
    section = page[page.index("## Serving under load"):]
    student = result["models"]["student"]
    assert f"| student | {student['params']:,} |" in section and "x the teacher's requests/s" in section
    quality = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())["models"]["student_kd"]["ndcg@10"]
    assert f"{quality:.4f}" in section


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
def test_on_a_gpu_machine_both_models_are_served_from_the_gpu(ray_session, tmp_path):
    cfg, result = _short_run(tmp_path)
    for entry in result["models"].values():
        assert entry["device"].startswith("cuda") and entry["deployment"]["ray_actor_options"]["num_gpus"] == 1
    assert result["machine"]["gpus"] >= 1
