"""Secrets stay secret and the API stays closed: model credentials reach the hub but never a log, a
result file or an artifact; the engine API answers 401 without its bearer token and 200 with it.
Real `kiln-engine` processes; a loopback stand-in for the Hugging Face Hub records what it was sent.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

pytest.importorskip("torch")

from tests.reliability.engine_process import TINY_CHAT, EngineProcess, run_cli  # noqa: E402
from tests.reliability.fake_hub import FakeHub, serving  # noqa: E402
from tests.reliability.report import Report  # noqa: E402

MODEL = "tiny-chat"


def canary(kind: str) -> str:
    """A secret value that occurs nowhere unless leaked."""
    return f"{kind}_{secrets.token_hex(16)}"


def files_containing(root: Path, needles: list[str]) -> list[str]:
    """Files under `root` whose bytes contain any needle."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path} contains {n[:8]}..." for n in needles if n.encode() in data]
    return hits


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with serving(FakeHub()) as server:
        yield server


def test_build_never_leaks_model_credentials(
    tmp_path: Path, hub: FakeHub, reliability_report: Report
) -> None:
    secret_env = {
        "HF_TOKEN": canary("hf"),
        "AWS_ACCESS_KEY_ID": canary("AKIA"),
        "AWS_SECRET_ACCESS_KEY": canary("aws"),
    }
    needles = list(secret_env.values())
    env = {
        **secret_env,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    leaks: list[str] = []

    # A build that succeeds (local checkpoint): output, result file and artifact are clean.
    artifact, result = tmp_path / "artifact", tmp_path / "result.json"
    ok = run_cli(
        ["build", "--model", str(TINY_CHAT), "--output", str(artifact), "--no-measure-capacity",
         "--device", "cpu", "--result-file", str(result)],
        env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert json.loads(result.read_text())["ok"] is True
    leaks += [f"build output contains {n[:8]}..." for n in needles if n in ok.stdout + ok.stderr]
    leaks += files_containing(artifact, needles) + files_containing(tmp_path / "result.json", needles)

    # A build from a private hf:// repository: the token goes to the hub, and nowhere else.
    failed_result = tmp_path / "failed.json"
    failed = run_cli(
        ["build", "--model", "hf://acme/private-model@0123abcd", "--output", str(tmp_path / "never"),
         "--no-measure-capacity", "--device", "cpu", "--result-file", str(failed_result)],
        env,
    )  # fmt: skip
    assert failed.returncode != 0
    outcome = json.loads(failed_result.read_text())
    assert outcome["ok"] is False and outcome["reason"] == "Unauthorized", outcome
    assert "rejected the credentials" in outcome["message"], outcome
    assert any(secret_env["HF_TOKEN"] in a for a in hub.authorizations), (
        "the token never reached the hub, so this test proves nothing",
        hub.authorizations,
    )
    leaks += [
        f"failed build output contains {n[:8]}..." for n in needles if n in failed.stdout + failed.stderr
    ]
    leaks += files_containing(tmp_path / "failed.json", needles)
    reliability_report.record(
        "security: credentials in build output, result file, artifact",
        2,
        len(leaks),
        f"HF/S3 canaries in env; hub saw the token {len(hub.authorizations)} times; failure reason "
        f"{outcome['reason']}; leaks: {leaks or 'none'}",
    )
    assert not leaks


def test_engine_api_requires_the_bearer_token_and_never_logs_it(
    tmp_path: Path, reliability_report: Report
) -> None:
    api_key, wrong_key, hf_token = canary("key"), canary("wrong"), canary("hf")
    key_file = tmp_path / "api-key"
    key_file.write_text(api_key + "\n")  # Secrets mounted as files often end in a newline
    key_file.chmod(0o400)
    args = ["--model", str(TINY_CHAT), "--device", "cpu", "--served-model-name", MODEL,
            "--api-key-file", str(key_file), "--log-level", "debug"]  # fmt: skip
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    problems: list[str] = []
    cases = 0
    with EngineProcess(args, tmp_path / "serve.log", env={"HF_TOKEN": hf_token}) as engine:
        for headers, expected in [
            ({}, 401),
            ({"authorization": f"Bearer {wrong_key}"}, 401),
            ({"authorization": f"Basic {api_key}"}, 401),
            ({"authorization": f"Bearer {api_key[:-1]}"}, 401),
            ({"authorization": "Bearer"}, 401),
            ({"authorization": f"Bearer {api_key}"}, 200),
            ({"authorization": f"bearer {api_key}"}, 200),
        ]:
            for method, path, payload in [
                ("POST", "/v1/completions", body),
                ("POST", "/v1/chat/completions", chat),
                ("GET", "/v1/models", None),
            ]:  # fmt: skip
                cases += 1
                r = httpx.request(method, engine.url + path, json=payload, headers=headers, timeout=60)
                if r.status_code != expected:
                    problems.append(
                        f"{method} {path} with {list(headers)} -> {r.status_code}, expected {expected}"
                    )
                elif expected == 401 and r.json()["error"]["code"] != "invalid_api_key":
                    problems.append(f"401 not in the OpenAI error shape: {r.text}")
                if wrong_key in r.text or api_key in r.text:
                    problems.append(f"{path} echoed a token back")
        for path in ("/health", "/ready", "/metrics"):  # kubelet probes and Prometheus carry no token
            cases += 1
            if httpx.get(engine.url + path, timeout=30).status_code != 200:
                problems.append(f"{path} needs a token; probes would fail")
    log = engine.output()
    leaked = [
        name
        for name, value in (("API key", api_key), ("wrong key", wrong_key), ("HF token", hf_token))
        if value in log
    ]
    reliability_report.record(
        "security: engine API bearer token (file)",
        cases,
        len(problems) + len(leaked),
        f"401 without/with a wrong token, 200 with it, probes open; log lines {len(log.splitlines())}, "
        f"secrets in them: {leaked or 'none'}",
    )
    assert not problems, problems
    assert not leaked, f"secrets in the serve log: {leaked}"


def test_an_unreadable_or_empty_key_file_refuses_to_start(tmp_path: Path) -> None:
    """Failing closed: a server told to require a key must not start without one."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for key_file in (empty, tmp_path / "missing"):
        result = run_cli(
            ["serve", "--model", str(TINY_CHAT), "--device", "cpu", "--api-key-file", str(key_file)],
            timeout=60,
        )
        assert result.returncode != 0, result.stdout[-1000:]
        assert "api-key-file" in result.stderr, result.stderr[-1000:]
