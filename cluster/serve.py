"""``recdistill serve``: one exported model of a run behind an HTTP endpoint, with Ray Serve.

The serving plan (:func:`plan_serving`) is made once on the driver, before anything starts: which
export (checked against its fingerprint and the run's dataset), replicas or autoscaling, CPUs and
GPUs per replica, batching. From it come both the running application (``serve.run``) and a Serve
config file, ``run_dir/serve/serve_config.yaml``, that ``serve deploy`` accepts on any cluster with
this project installed (its import path is :func:`build_app`).

Each replica of :class:`Recommender` loads the export once (:class:`cluster.serving.ServedModel`)
and answers with dynamic batching (``@serve.batch``: requests that arrive together share one
forward pass). Bad requests are answered 4xx before they reach a batch, so they never fail the
batch of others; every answer carries the served model's fingerprint in ``x-recdistill-fingerprint``.

    POST {route_prefix}   {"history": ["1193", "661"], "k": 10, "filter_seen": true}
    GET  {route_prefix}   the served model: fingerprint, parameters, catalog size, limits
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from cluster.common import model_exports
from cluster.config import Config, ConfigError
from cluster.serving import FINGERPRINT_HEADER, BadRequest, ParsedRequest, ServedModel
from data_pipeline import fsio
from data_pipeline.credentials import without_secrets
from data_pipeline.dataset import load_manifest
from data_pipeline.exports import check_export_fits_dataset, verify_export
from data_pipeline.layout import RunLayout

log = logging.getLogger(__name__)

DEPLOYMENT = "Recommender"
IMPORT_PATH = "cluster.serve:build_app"


@dataclass(frozen=True)
class ServePlan:
    model: str  # the name served (student_kd, ..., or "export" for a URL)
    export_url: str
    data_url: str
    fingerprint: str
    gpus_per_replica: float
    app_args: dict[str, Any]  # what each replica needs to load the model (no credentials)
    deployment: dict[str, Any]  # Ray Serve deployment options
    config_file: str  # where the Serve config file is written


def plan_serving(cfg: Config, cluster_gpus: Optional[float] = None) -> ServePlan:
    """Every decision of a serving job, checked before any replica starts (a missing or damaged export,
    or one trained on another dataset, is refused here with its URL)."""
    s = cfg.serve
    exports = model_exports(cfg)
    if s.model in exports:
        name, url = s.model, exports[s.model]
    elif "/" in s.model or "://" in s.model:
        name, url = "export", s.model if "://" in s.model else str(Path(s.model).expanduser().resolve())
    else:
        raise ConfigError(f"serve.model: {s.model!r} is neither one of {', '.join(exports)} nor the URL of an export")
    storage = cfg.data.storage_options
    layout = RunLayout(cfg.run.run_dir)
    meta = verify_export(url, storage)  # ExportMissing names the URL: "no exported model at ... (not trained yet)"
    check_export_fits_dataset(meta, load_manifest(layout.data, storage), url)
    if s.gpus_per_replica is not None:
        gpus = s.gpus_per_replica
    else:
        gpus = 1.0 if (cluster_gpus if cluster_gpus is not None else _local_gpus()) > 0 else 0.0
    args = {"export_url": url, "data_url": layout.data, "model_name": name, "device": "cuda" if gpus > 0 else "cpu",
            "max_k": s.max_k, "max_history": s.max_history,
            # Endpoints and the like; credentials come from the replicas' environment (never written to a file).
            "storage_options": without_secrets(storage)}
    deployment: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": gpus},
        "user_config": {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
    }
    if s.autoscaling is not None:
        deployment["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        deployment["num_replicas"] = s.num_replicas
    return ServePlan(model=name, export_url=url, data_url=layout.data, fingerprint=meta["fingerprint"],
                     gpus_per_replica=gpus, app_args=args, deployment=deployment,
                     config_file=fsio.join(layout.run_dir, "serve", "serve_config.yaml"))


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def serve_config(cfg: Config, plan: ServePlan) -> dict[str, Any]:
    """The Serve config file (Ray's ``ServeDeploySchema``) for ``serve deploy``."""
    s = cfg.serve
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.port},
        "applications": [{
            "name": s.app_name,
            "route_prefix": s.route_prefix,
            "import_path": IMPORT_PATH,
            "args": plan.app_args,
            "deployments": [{"name": DEPLOYMENT, **plan.deployment}],
        }],
    }


# --------------------------------------------------------------------------------------
# The deployment


def _deployment_class():
    """The Ray Serve deployment, defined on first use so that importing this module needs no Ray Serve."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name=DEPLOYMENT)
    class Recommender:
        def __init__(self, export_url: str, data_url: str, model_name: str, device: str = "cpu", max_k: int = 100,
                     max_history: int = 2000, storage_options: Optional[dict[str, Any]] = None):
            self.model = ServedModel(export_url, data_url, storage_options, device, max_k, max_history)
            self.name = model_name
            self.headers = {FINGERPRINT_HEADER: self.model.fingerprint}

        def reconfigure(self, user_config: dict[str, Any]) -> None:
            # Batching settings are the deployment's user_config: `serve deploy` changes them without a restart.
            self.answer.set_max_batch_size(int(user_config.get("max_batch_size", 32)))
            self.answer.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.002)))

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET":
                return JSONResponse({"model": self.name, **self.model.info()}, headers=self.headers)
            if request.method != "POST":
                return self._error(BadRequest(f"use POST (a recommendation) or GET (the model), not {request.method}", 405))
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.model.max_body_bytes:  # refused before it is read
                return self._error(BadRequest(self.model.too_large(int(declared)), 413))
            try:
                parsed = self.model.parse(await request.body())
            except BadRequest as exc:
                return self._error(exc)
            answer = await self.answer(parsed)
            return JSONResponse({"model": self.name, **answer}, headers=self.headers)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def answer(self, requests: list[ParsedRequest]) -> list[dict[str, Any]]:
            # The forward runs in a thread (torch releases the GIL): the replica keeps taking requests for the next batch.
            return await asyncio.get_running_loop().run_in_executor(None, self.model.recommend, requests)

        def _error(self, exc: BadRequest) -> JSONResponse:
            return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=self.headers)

    return Recommender


def build_app(args: dict[str, Any]):
    """The application builder named by the Serve config file (``import_path: cluster.serve:build_app``)."""
    return _deployment_class().bind(**args)


def application(plan: ServePlan, storage_options: Optional[dict[str, Any]] = None):
    """The application of a serving plan, with its deployment options (what ``serve.run`` takes).
    ``storage_options`` (credentials included) go to the replicas in memory, never into a file."""
    args = {**plan.app_args, "storage_options": storage_options if storage_options is not None else plan.app_args["storage_options"]}
    return _deployment_class().options(**plan.deployment).bind(**args)


# --------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, write_only: bool = False, block: bool = True) -> ServePlan:
    """Plan, write the Serve config file, and (unless ``write_only``) start the application on the
    run's Ray cluster, blocking until Ctrl-C when ``block``."""
    from cluster.ray_setup import ensure_ray

    cluster_gpus = None
    if not write_only:
        ensure_ray(cfg)
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    plan = plan_serving(cfg, cluster_gpus)
    text = yaml.safe_dump(serve_config(cfg, plan), sort_keys=False)
    fsio.atomic_write_bytes(plan.config_file, text.encode(), cfg.data.storage_options)
    print(f"serve: {plan.model} ({plan.export_url}, fingerprint {plan.fingerprint[:12]}…); "
          f"Serve config for `serve deploy`: {plan.config_file}")
    if write_only:
        return plan
    from ray import serve

    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(application(plan, cfg.data.storage_options), name=s.app_name, route_prefix=s.route_prefix)
    endpoint = f"http://{s.host}:{s.port}{s.route_prefix}"
    print(f"serve: {plan.model} answers at {endpoint}\n"
          f"  curl -s {endpoint} -H 'content-type: application/json' -d '{{\"history\": [], \"k\": 10}}'")
    if block:
        try:
            while True:
                asyncio.run(asyncio.sleep(3600))
        except KeyboardInterrupt:
            serve.delete(s.app_name)
            print(f"serve: {s.app_name} stopped")
    return plan
