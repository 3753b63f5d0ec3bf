"""The container adapter's small helpers: the base environment and reading a log's tail."""

from __future__ import annotations

from pathlib import Path

from kiln.processnode import container


def test_base_env_puts_the_venv_first_and_keeps_the_agents_secrets_out() -> None:
    agent_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "KUBECONFIG": "/admin/kubeconfig",
        "AWS_SECRET": "x",
    }
    env = container.base_env(["/repo/.venv/bin"], agent_env)
    assert env["PATH"] == "/repo/.venv/bin:/usr/bin:/bin"
    assert env["HOME"] == "/root" and env["PYTHONUNBUFFERED"] == "1"
    assert "KUBECONFIG" not in env and "AWS_SECRET" not in env


def test_read_tail_reads_after_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_bytes(b"old run\nnew run\n")
    assert container.read_tail(log, 8) == "new run\n"
    assert container.read_tail(log, 0, max_bytes=4) == "run\n"  # only the last bytes of a long log
    assert container.read_tail(tmp_path / "missing.log", 0) == ""
