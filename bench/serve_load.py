"""What distillation buys at serving time: the student and the teacher behind Ray Serve, under load.

    python -m bench.serve_load --config configs/ml1m.yaml --student runs/ml1m/sweep/1in10-s0-kd --name ml1m

Both models are served the same way on the same machine (``recdistill serve``'s deployment: the same
replicas, CPUs, batching), as two applications of one local Ray cluster, and driven by a bounded
closed-loop load generator on loopback: at each concurrency level, ``concurrency`` clients each send
their next request as soon as the last is answered, until the level's fixed number of requests is
done. The levels alternate student and teacher, so that a noisy neighbour hits both alike. Requests
are the test users' real histories (original item ids), k = 10.

Reported per model and level: requests/s, p50/p95/p99 latency, errors; and the largest load each
holds with p99 under ``--p99-ms`` (the highest throughput among the levels within the bound). The
headline is the ratio of those loads, student / teacher. Writes bench/results/serve_load_<name>.json,
a plot next to it, and (with ``--report``) a copy into the run's report folder, which the pipeline's
report shows beside quality and size.

The load generator shares the machine with the servers (on 2 cores it takes a share of them): it
is the same for both models, and its own ceiling is measured against an empty endpoint (``ceiling``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = [1, 2, 4, 8, 16, 32, 64]


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, total: int) -> dict[str, Any]:
    """``concurrency`` clients send ``total`` requests back to back (cycling through ``bodies``)."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(total))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            start = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers={"content-type": "application/json"}) as reply:
                    await reply.read()
                    if reply.status != 200:
                        errors[str(reply.status)] = errors.get(str(reply.status), 0) + 1
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # a timed-out request is an error of its level, not the run's
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"concurrency": concurrency, "requests": total, "ok": len(latencies), "errors": errors, "seconds": wall,
            "rps": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def sustainable(levels: list[dict[str, Any]], p99_ms: float) -> dict[str, Any] | None:
    """The level with the highest requests/s whose p99 is within the bound and that had no error (None: none is)."""
    within = [lv for lv in levels if lv["p99_ms"] <= p99_ms and not lv["errors"]]
    return max(within, key=lambda lv: lv["rps"]) if within else None


def requests_per_level(concurrency: int, minimum: int) -> int:
    return max(minimum, 25 * concurrency)


def _bodies(cfg, count: int) -> list[bytes]:
    from data_pipeline.dataset import read_item_ids, read_split
    from data_pipeline.layout import RunLayout

    layout = RunLayout(cfg.run.run_dir)
    raw = read_item_ids(layout.data, cfg.data.storage_options)
    test = read_split(layout.data, "test", cfg.data.storage_options).slice(0, count)
    return [json.dumps({"history": [raw[i - 1] for i in h], "k": 10}).encode() for h in test.column("history").to_pylist()]


def _empty_deployment():
    """An endpoint that answers at once: what the proxy and this load generator manage without a model."""
    from ray import serve

    @serve.deployment(name="Empty")
    class Empty:
        async def __call__(self, request) -> dict:
            await request.body()
            return {"items": []}

    return Empty


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"student": "tab:blue", "teacher": "tab:red"}
    for name, entry in result["models"].items():
        levels = entry["levels"]
        ax.plot([lv["rps"] for lv in levels], [lv["p99_ms"] for lv in levels], "o-", color=colours.get(name),
                label=f"{name} ({entry['params']:,} params)")
        for lv in levels:
            ax.annotate(str(lv["concurrency"]), (lv["rps"], lv["p99_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(result["p99_bound_ms"], color="gray", ls="--", lw=1, label=f"p99 bound {result['p99_bound_ms']:g} ms")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms, log)")
    ax.set_yscale("log")
    ax.set_title(f"Ray Serve under closed-loop load ({result['name']}; labels: concurrency)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--student", required=True, help="The student's export (a run's student_kd or a sweep member's folder).")
    parser.add_argument("--teacher", default="teacher", help="The teacher's export (default: the run's).")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--min-requests", type=int, default=1000,
                        help="Requests per level: max(this, 25 x concurrency); 1000 puts 10 samples above each level's p99.")
    parser.add_argument("--p99-ms", type=float, default=100.0)
    parser.add_argument("--report", action="store_true", help="Also copy the result into the run's report folder.")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from cluster import serve as serve_stage
    from cluster.common import code_version
    from cluster.config import load_config
    from cluster.ray_setup import ensure_ray, free_port
    from data_pipeline import fsio
    from data_pipeline.layout import RunLayout

    port = free_port()
    base = load_config(args.config, [*args.overrides, f"serve.port={port}"]).with_absolute_paths()
    ensure_ray(base)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    models: dict[str, Any] = {}
    try:
        for name, model in (("student", args.student), ("teacher", args.teacher)):
            cfg = load_config(args.config, [*args.overrides, f"serve.port={port}", f"serve.model={model}",
                                            f"serve.app_name={name}", f"serve.route_prefix=/{name}"]).with_absolute_paths()
            plan = serve_stage.plan_serving(cfg, gpus)
            serve.run(serve_stage.application(plan, cfg.data.storage_options), name=name, route_prefix=f"/{name}")
            info = json.loads(_get(f"http://127.0.0.1:{port}/{name}"))
            models[name] = {"export": plan.export_url, "params": info["params"], "fingerprint": info["fingerprint"],
                            "device": info["device"], "deployment": plan.deployment, "levels": []}
            print(f"serving {name}: {info['params']:,} parameters on {info['device']} ({plan.export_url})", flush=True)
        # The same deployment settings, but no CPU reserved: it does no model work, and where the two models'
        # replicas hold every CPU (2 cores) a reservation would leave it unscheduled for ever.
        same_settings = {k: v for k, v in plan.deployment.items() if k not in ("user_config", "ray_actor_options")}
        empty = _empty_deployment().options(**same_settings, ray_actor_options={"num_cpus": 0})
        serve.run(empty.bind(), name="empty", route_prefix="/empty")
        bodies = _bodies(base, 2000)
        levels = [int(c) for c in args.levels.split(",")]
        ceiling = [asyncio.run(closed_loop(f"http://127.0.0.1:{port}/empty", bodies, c, requests_per_level(c, args.min_requests)))
                   for c in sorted({levels[0], levels[len(levels) // 2], levels[-1]})]
        serve.delete("empty")
        print("ceiling (an endpoint without a model): " + ", ".join(f"{lv['rps']:.0f} req/s at {lv['concurrency']} clients"
                                                                     for lv in ceiling), flush=True)
        for name in models:  # warm-up: first requests build caches and threads
            asyncio.run(closed_loop(f"http://127.0.0.1:{port}/{name}", bodies, 4, 100))
        print(f"{'model':<9}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for i, concurrency in enumerate(levels):
            order = list(models) if i % 2 == 0 else list(reversed(models))  # alternate who goes first
            for name in order:
                lv = asyncio.run(closed_loop(f"http://127.0.0.1:{port}/{name}", bodies, concurrency,
                                             requests_per_level(concurrency, args.min_requests)))
                models[name]["levels"].append(lv)
                print(f"{name:<9}{concurrency:>8}{lv['rps']:>9.1f}{lv['p50_ms']:>9.1f}{lv['p95_ms']:>9.1f}{lv['p99_ms']:>9.1f}"
                      f"{sum(lv['errors'].values()):>8}", flush=True)
    finally:
        serve.shutdown()
    for entry in models.values():
        entry["levels"].sort(key=lambda lv: lv["concurrency"])
        entry["sustainable"] = sustainable(entry["levels"], args.p99_ms)
    student, teacher = (models[n]["sustainable"] for n in ("student", "teacher"))
    ratio = student["rps"] / teacher["rps"] if student and teacher else None
    result = {"name": args.name, "config": args.config, "p99_bound_ms": args.p99_ms, "models": models,
              "throughput_ratio_at_p99_bound": ratio, "ceiling": ceiling, "params_ratio": models["teacher"]["params"] / models["student"]["params"],
              "machine": {"cpus": ray.cluster_resources().get("CPU"), "gpus": gpus}, "code": code_version(),
              "note": "closed loop on loopback; the load generator shares the machine with the servers"}
    out = Path(args.results_dir) / f"serve_load_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(result, out.with_suffix(".png"))
    if args.report:
        fsio.write_json_atomic(fsio.join(RunLayout(base.run.run_dir).report, "serve_load.json"), result, base.data.storage_options)
    for name, entry in models.items():
        best = entry["sustainable"]
        print(f"{name}: highest load with p99 <= {args.p99_ms:g} ms: "
              + (f"{best['rps']:.1f} req/s at {best['concurrency']} clients (p99 {best['p99_ms']:.1f} ms)" if best else "none"))
    print(f"student / teacher requests/s at p99 <= {args.p99_ms:g} ms: " + (f"{ratio:.2f}x" if ratio else "n/a")
          + f"  -> {out}")
    return 0


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as reply:  # noqa: S310 (loopback)
        return reply.read().decode()


if __name__ == "__main__":
    sys.exit(main())
