"""A half-written or tampered artifact is never served: `kiln-engine build` killed at every step leaves
nothing that verifies, and `kiln-engine serve --verify` (the default) refuses every corruption that
`kiln-engine verify` finds. Real `kiln-engine` processes on the tiny-chat checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

pytest.importorskip("torch")

from kiln_engine.build.manifest import MANIFEST_NAME  # noqa: E402
from tests.reliability.engine_process import KILN_ENGINE, TINY_CHAT, EngineProcess, run_cli  # noqa: E402
from tests.reliability.report import Report  # noqa: E402

PROGRESS_PREFIX = "KILN_PROGRESS "


def build(output: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(
        [
            "build",
            "--model",
            str(TINY_CHAT),
            "--output",
            str(output),
            "--no-measure-capacity",
            "--device",
            "cpu",
        ]
    )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("artifact") / "tiny-chat"
    done = build(output)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return output


def weight_file(root: Path) -> Path:
    return max((p for p in root.rglob("*.safetensors")), key=lambda p: p.stat().st_size)


def flip_a_byte(root: Path) -> None:
    target = weight_file(root)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def truncate(root: Path) -> None:
    target = weight_file(root)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


def tamper_manifest_checksum(root: Path) -> None:
    path = root / MANIFEST_NAME
    text = path.read_text()
    manifest = json.loads(text)
    digest = next(f["sha256"] for f in manifest["files"])
    path.write_text(text.replace(digest, "0" * len(digest), 1))


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "manifest missing (publish interrupted)": lambda root: (root / MANIFEST_NAME).unlink(),
    "manifest truncated": lambda root: (root / MANIFEST_NAME).write_text(
        (root / MANIFEST_NAME).read_text()[:100]
    ),
    "weight byte flipped (checksum wrong)": flip_a_byte,
    "weight file truncated": truncate,
    "weight file missing": lambda root: weight_file(root).unlink(),
    "tokenizer missing": lambda root: (root / "tokenizer.json").unlink(),
    "manifest checksum tampered": tamper_manifest_checksum,
}


def serve_refuses(root: Path) -> str | None:
    """Why `kiln-engine serve --artifact root` wrongly came up, or None when it refused (exited non-zero)."""
    port = "0"  # never bound if the artifact is refused first
    try:
        done = run_cli(
            ["serve", "--artifact", str(root), "--device", "cpu", "--host", "127.0.0.1", "--port", port],
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "serve did not exit: it is serving a corrupt artifact"
    if done.returncode == 0:
        return "serve exited 0"
    return None


def test_every_corruption_is_refused_by_verify_and_serve(
    artifact: Path, tmp_path: Path, reliability_report: Report
) -> None:
    assert run_cli(["verify", str(artifact)]).returncode == 0
    served: list[str] = []
    for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
        copy = tmp_path / f"case-{i}" / "artifact"
        shutil.copytree(artifact, copy)
        corrupt(copy)
        verify = run_cli(["verify", str(copy)])
        if verify.returncode == 0:
            served.append(f"{name}: verify passed")
        if (why := serve_refuses(copy)) is not None:
            served.append(f"{name}: {why}")
    reliability_report.record(
        "artifact: corrupted or half-written, then verified and served",
        len(CORRUPTIONS),
        len(served),
        "verify exit 1 and serve refused for: " + ", ".join(CORRUPTIONS) if not served else "; ".join(served),
    )
    assert not served, served


def test_the_intact_artifact_serves(artifact: Path, tmp_path: Path) -> None:
    """The positive control: what the corruptions broke really is what makes serving work."""
    args = ["--artifact", str(artifact), "--device", "cpu", "--served-model-name", "tiny-chat"]
    with EngineProcess(args, tmp_path / "serve.log") as engine:
        answer = httpx.post(
            engine.url + "/v1/completions",
            json={"model": "tiny-chat", "prompt": "Hello", "max_tokens": 3},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text


def test_build_killed_at_every_step_leaves_nothing_servable(
    tmp_path: Path, reliability_report: Report
) -> None:
    """SIGKILL `kiln-engine build` after its k-th progress line, for many k: the output either does
    not exist or fails verification (so serve refuses it) unless the build had published; and the
    next build into the same place succeeds."""
    output = tmp_path / "out" / "tiny-chat"
    steps = [
        line
        for line in build(tmp_path / "probe" / "tiny-chat").stdout.splitlines()
        if line.startswith(PROGRESS_PREFIX)
    ]
    assert len(steps) >= 5, steps
    outcomes: dict[str, int] = {}
    bad: list[str] = []
    # every other step, and each of the last three (write, checksum, publish): where atomicity matters
    kill_points = sorted(set(range(1, len(steps), 2)) | set(range(max(1, len(steps) - 3), len(steps))))
    for k in kill_points:
        shutil.rmtree(output.parent, ignore_errors=True)
        output.parent.mkdir(parents=True)
        command = [str(KILN_ENGINE), "build", "--model", str(TINY_CHAT), "--output", str(output),
                   "--no-measure-capacity", "--device", "cpu"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        ) as proc:
            assert proc.stdout is not None
            seen = 0
            for line in proc.stdout:
                seen += line.startswith(PROGRESS_PREFIX)
                if seen == k:
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.wait(60)
        if not output.exists():
            state = "no artifact"
        elif run_cli(["verify", str(output)]).returncode == 0:
            state = "complete (killed after publishing)"
        else:
            state = "partial, refused"
            if serve_refuses(output) is not None:
                bad.append(f"killed after step {k}: a partial artifact was served")
        outcomes[state] = outcomes.get(state, 0) + 1
    rebuilt = build(output)
    if rebuilt.returncode != 0 or run_cli(["verify", str(output)]).returncode != 0:
        bad.append("a build into the place of a killed one failed")
    reliability_report.record(
        f"artifact: build SIGKILLed after progress steps {kill_points} of {len(steps)}",
        len(kill_points),
        len(bad),
        f"{outcomes}; rebuild afterwards ok" if not bad else "; ".join(bad),
    )
    assert not bad, bad
