import yaml

from cluster.common import redact, save_resolved_config
from cluster.config import build_config


def test_redact_hides_credentials_by_key_and_by_value():
    options = {
        "key": "AKIA123", "secret": "s3cr3t", "anon": False, "endpoint_url": "http://127.0.0.1:5000",
        "headers": {"Authorization": "Bearer abc.def", "X-Trace": "plain"},
        "client_kwargs": {"aws_session_token": "tok", "region_name": "eu-west-1"},
        "anything": "Basic dXNlcjpwYXNz",
    }
    out = redact(options)
    assert out["key"] == out["secret"] == "***"
    assert out["headers"] == {"Authorization": "***", "X-Trace": "***"}  # every header may carry a credential
    assert out["client_kwargs"] == {"aws_session_token": "***", "region_name": "eu-west-1"}
    assert out["anything"] == "***"  # a scheme credential under a harmless key
    assert out["anon"] is False and out["endpoint_url"] == "http://127.0.0.1:5000"
    assert options["headers"]["Authorization"] == "Bearer abc.def"  # a copy: the input is untouched


def test_redact_strips_userinfo_and_signatures_from_urls():
    assert redact("https://alice:pw@host/log.csv") == "https://***@host/log.csv"
    assert redact("https://host/log.csv?X-Amz-Signature=abc&part=1") == "https://host/log.csv?X-Amz-Signature=***&part=1"
    assert redact("s3://bucket/run") == "s3://bucket/run"


def test_resolved_config_on_disk_holds_no_credential(tmp_path):
    cfg = build_config({
        "run": {"run_dir": str(tmp_path)},
        "data": {"format": "csv", "path": "https://bob:hunter2@example.org/log.csv",
                 "storage_options": {"headers": {"Authorization": "Bearer sekret-token"}, "token": "t0k"}},
    })
    save_resolved_config(cfg)
    text = (tmp_path / "config.yaml").read_text()
    for secret in ("sekret-token", "hunter2", "t0k", "bob"):
        assert secret not in text
    assert yaml.safe_load(text)["data"]["path"] == "https://***@example.org/log.csv"


def test_a_process_started_with_sigint_ignored_is_interruptible_again():
    # As `nohup recdistill ... &` from a script starts it: SIGINT ignored, so Python would never raise KeyboardInterrupt.
    import signal
    import subprocess
    import sys
    from pathlib import Path

    child = ("import os, signal, time\n"
             "from cluster.common import restore_interrupt\n"
             "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
             "restore_interrupt()\n"
             "try:\n"
             "    os.kill(os.getpid(), signal.SIGINT)\n"
             "    time.sleep(5)\n"
             "except KeyboardInterrupt:\n"
             "    raise SystemExit(130)\n"
             "raise SystemExit(0)\n")
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    done = subprocess.run([sys.executable, "-c", child], preexec_fn=ignore, cwd=Path(__file__).parents[2], timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 130, done.stderr
