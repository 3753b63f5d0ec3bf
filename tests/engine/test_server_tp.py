"""Tensor-parallel serving on CPU (gloo): `kiln-engine serve --artifact <tp=2 artifact>` starts its
follower rank itself, answers exactly like the unsharded checkpoint, and drains both ranks on SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

pytest.importorskip("torch")
from kiln_engine.build.pipeline import BuildOptions, run_build  # noqa: E402
from kiln_engine.build.progress import Progress  # noqa: E402
from kiln_engine.server.app import ServerSettings  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import ThreadServer, free_port  # noqa: E402

PROMPTS = ["Hello, world", "The quick brown fox jumps", "Numbers: 0 1 2"]


def test_tp2_artifact_serves_like_the_checkpoint(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "llama", seed=21)
    art = tmp_path / "tp2"
    run_build(
        BuildOptions(model=str(ckpt), output=str(art), tensor_parallel_size=2, measure_capacity=False),
        Progress(out=io.StringIO(), bar=False),
    )
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln_engine.cli", "serve", "--artifact", str(art), "--served-model-name",
         "tiny-llama", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
         "--max-model-len", "256", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        bodies = [{"model": "tiny-llama", "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                  for p in PROMPTS]  # fmt: skip
        sharded = [httpx.post(url + "/v1/completions", json=b, timeout=60).json() for b in bodies]
        with httpx.stream(
            "POST", url + "/v1/completions", json={**bodies[0], "stream": True}, timeout=60
        ) as r:
            streamed = "".join(
                json.loads(line[6:])["choices"][0]["text"]
                for line in r.iter_lines()
                if line.startswith("data: {")
            )
        with ThreadServer(ckpt, ServerSettings(), max_model_len=256) as single:
            whole = [httpx.post(single.url + "/v1/completions", json=b, timeout=60).json() for b in bodies]
        assert [x["choices"][0]["text"] for x in sharded] == [x["choices"][0]["text"] for x in whole]
        assert streamed == whole[0]["choices"][0]["text"]
        # SIGTERM to the whole group, as a container runtime may send it: rank 0 drains, followers wait
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        assert time.monotonic() - started < 25, "the follower should stop when rank 0 tells it to"
        out = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
        assert out.stdout.strip() == "", "no rank may outlive rank 0"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
