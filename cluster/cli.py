"""``recdistill <stage> --config FILE [dotted.key=value ...]``

The same entry point as ``python -m cluster.cli <stage> ...``, the form used with
``ray job submit --working-dir .``. Every stage reads one validated config,
writes under ``run.run_dir`` and saves the resolved config to ``run_dir/config.yaml``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import re
import sys
from typing import Callable

from data_pipeline.ingest import DataError
from data_pipeline.soft_labels import SoftLabelError
from cluster.config import Config, ConfigError, load_config
from data_pipeline.exports import ExportError
from data_pipeline.streaming import StreamError

# stage name -> (module in cluster/, one-line help). Modules are imported lazily so that
# `--help` stays fast and a stage's heavy dependencies load only when it runs.
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("cluster.prepare", "Ingest the interaction log and write leave-one-out example shards to run_dir/data."),
    "train-teacher": ("cluster.train_teacher", "Train the teacher with Ray Train + DeepSpeed ZeRO; export to run_dir/teacher."),
    "precompute": ("cluster.precompute", "Run the teacher once over the training positions; write soft labels to run_dir/soft_labels."),
    "distill": ("cluster.distill", "Train the student from the soft-label store (or --baseline: without the teacher)."),
    "evaluate": ("cluster.evaluate", "Full-ranking HR@K/NDCG@K of every model present; write run_dir/report/metrics.json."),
    "sweep": ("cluster.sweep", "Train a family of students (sizes x seeds, each with its twin) from one store; write the frontier."),
    "serve": ("cluster.serve", "Serve an exported model (serve.model) over HTTP with Ray Serve; write a Serve config file for `serve deploy`."),
    "pipeline": ("cluster.pipeline", "Run every stage in order, skipping the ones already done."),
    "plan": ("cluster.show_plan", "Print the run plan (inputs, storage layout, what each stage will do, problems); starts nothing."),
    "inspect": ("cluster.inspect", "Print a soft-label store's manifest and verify every shard's checksum and row count."),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults).")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of an error, not only its message.")
    parser.add_argument(
        "overrides", nargs="*", metavar="dotted.key=value", help="Config overrides, e.g. run.run_dir=s3://bucket/run1"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recdistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, (_, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == "inspect":  # before the overrides, which take every remaining positional
            stage_parser.add_argument("url", nargs="?", default=None,
                                      help="Soft-label store URL (e.g. runs/tiny/soft_labels or s3://bucket/run/soft_labels; "
                                      "default: the run's own store, run.run_dir/soft_labels).")
        _add_common(stage_parser)
        if name == "plan":
            stage_parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
        if name == "serve":
            stage_parser.add_argument("--write-config", action="store_true",
                                      help="Only check the export and write run_dir/serve/serve_config.yaml (for `serve deploy`).")
        if name == "distill":
            stage_parser.add_argument(
                "--baseline", action="store_true", help="Train the identical student without the teacher (alpha=1)."
            )
    return parser


def stage_function(name: str) -> Callable[..., object]:
    module = importlib.import_module(STAGES[name][0])
    return module.run  # type: ignore[no-any-return]


# A user's mistake or a fault in the environment, not a bug: one line, no traceback (unless --debug).
USER_ERRORS = (ConfigError, DataError, ExportError, SoftLabelError, StreamError)


def is_override(arg: str) -> bool:
    """``dotted.key=value`` (every config key has a section: ``run.seed``), rather than a URL or a path
    that happens to hold an ``=`` (``dt=2024-01-01/soft_labels``)."""
    return re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=.*", arg, flags=re.DOTALL) is not None


def main(argv: list[str] | None = None) -> int:
    from cluster.common import restore_interrupt

    restore_interrupt()  # kill -INT stops a background run as Ctrl-C does
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come before, between or after the options (`inspect URL --config F k=v`).
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    if getattr(args, "url", None) and is_override(args.url):  # `inspect k=v ...`: no URL was given
        args.overrides.insert(0, args.url)
        args.url = None
    try:
        cfg: Config = load_config(args.config, args.overrides).with_absolute_paths()
    except ConfigError as exc:
        print(f"recdistill: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.run.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs: dict[str, object] = {"baseline": True} if getattr(args, "baseline", False) else {}
    if args.stage == "inspect":
        kwargs["url"] = args.url
    if args.stage == "plan":
        kwargs["as_json"] = args.json
    if args.stage == "serve":
        kwargs["write_only"] = args.write_config
    try:
        stage_function(args.stage)(cfg, **kwargs)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"recdistill {args.stage}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"recdistill {args.stage}: {exc or 'interrupted'}. Every file a stage committed is whole (atomic writes); "
              "run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if type(exc).__name__ == "TrainingFailedError":
            print(f"recdistill {args.stage}: the workers failed: {worker_error(exc)} "
                  "(the worker log above has the full traceback)", file=sys.stderr)
            return 1
        message = environment_error(exc)
        if message is None:  # neither the user's input nor the environment: a bug here, keep the traceback
            raise
        print(f"recdistill {args.stage}: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


#: Storage-client errors (botocore, aiohttp, gcsfs, adlfs) by class name, so that none has to be installed.
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "InvalidAccessKeyId",
                      "SignatureDoesNotMatch", "ExpiredToken", "ClientAuthenticationError", "RefreshError"}
_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                      "ServerTimeoutError", "ConnectionError", "ConnectionRefusedError", "NewConnectionError",
                      "ServiceUnavailableError"}


def environment_error(exc: BaseException) -> str | None:
    """One line for a fault of the environment (storage credentials or endpoint, a full or read-only disk,
    permissions), from ``exc`` or its causes; None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if name in _CREDENTIAL_ERRORS:
            return (f"storage credentials were refused or not found ({name}: {current}). Set them in the environment "
                    "(e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or in data.storage_options")
        if name in _CONNECTION_ERRORS:
            return f"cannot reach the storage endpoint ({name}: {current}): check data.storage_options (endpoint_url) and the network"
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"out of disk space: {current}. Free space (or point run.run_dir elsewhere) and run again to resume"
        if isinstance(current, (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError)) or (
                isinstance(current, OSError) and current.errno == errno.EROFS):
            return f"{type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return None


def worker_error(exc: BaseException) -> str:
    """The root cause of a Ray Train failure in one line: the last ``SomeError: message`` line of its text."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line)]
    return (causes or lines or [type(exc).__name__])[-1]


if __name__ == "__main__":
    sys.exit(main())
