"""`kiln-engine build` on tiny checkpoints: quantization, tp/pp shards, manifest and checksums,
interrupted builds, capacity, and serving the artifact token-for-token like the checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from kiln_engine.build.manifest import VerificationError, read_manifest, verify_artifact  # noqa: E402
from kiln_engine.build.pipeline import INVALID_OPTIONS, BuildError, BuildOptions, run_build  # noqa: E402
from kiln_engine.build.progress import Progress, parse_line  # noqa: E402
from kiln_engine.cli import main  # noqa: E402
from kiln_engine.config import EngineConfig  # noqa: E402
from kiln_engine.engine import LLMEngine  # noqa: E402
from kiln_engine.interface import SamplingParams  # noqa: E402
from kiln_engine.layers.sharding import tp_shard_dim  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint, make_tiny_eagle3_head, make_tiny_eagle_head  # noqa: E402

PROMPTS = [[5, 17, 42, 99, 3], [200, 11, 7], list(range(20, 60))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama", seed=11, shards=2)


def build(checkpoint: Path | str, out: Path | str, **kw: object) -> tuple[Path, list[dict]]:
    buf = io.StringIO()
    opts = BuildOptions(model=str(checkpoint), output=str(out), device="cpu", **kw)  # type: ignore[arg-type]
    published = run_build(opts, Progress(out=buf, bar=False, min_interval_s=0))
    lines = [p for p in (parse_line(line) for line in buf.getvalue().splitlines()) if p is not None]
    return Path(published), lines


def greedy(path: Path, n: int = 16) -> list[list[int]]:
    engine = LLMEngine(path, EngineConfig(device="cpu", max_model_len=256))
    return engine.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


def test_none_build_serves_the_same_greedy_tokens(checkpoint: Path, tmp_path: Path) -> None:
    art, progress = build(checkpoint, tmp_path / "art", measure_capacity=True, max_batch_size=4)
    manifest = verify_artifact(art)
    assert manifest.quantization == "none" and manifest.tensor_parallel_size == 1
    assert manifest.gpu_arch == "cpu" and manifest.runtime.version
    assert manifest.weight_files == {"0": ["rank-0/model.safetensors"]}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "rank-0/model.safetensors"} <= {
        f.path for f in manifest.files
    }
    cap = manifest.capacity
    assert cap is not None and cap.output_tokens_per_second > 0 and cap.prefill_tokens_per_second > 0
    assert 1 <= cap.max_concurrency_at_ttft_target <= 4 and cap.ttft_target_ms == 500.0
    steps = [p["step"] for p in progress]
    assert steps[0] == "fetch" and steps[-1] == "done" and "capacity" in steps and "convert" in steps
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert greedy(art) == greedy(checkpoint)


def test_serving_the_artifact_over_http_matches_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    import httpx

    from kiln_engine.server.app import ServerSettings
    from tests.engine.test_server import ThreadServer

    art, _ = build(checkpoint, tmp_path / "art", measure_capacity=False)
    body = {"model": "tiny-llama", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    texts = []
    for path in (checkpoint, art):
        with ThreadServer(path, ServerSettings(), max_model_len=256) as s:
            texts.append(
                httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            )
    assert texts[0] == texts[1]


@pytest.mark.parametrize("quantization", ["bf16", "fp16"])
def test_half_precision_builds(checkpoint: Path, tmp_path: Path, quantization: str) -> None:
    art, _ = build(checkpoint, tmp_path / quantization, quantization=quantization, measure_capacity=False)
    manifest = verify_artifact(art)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[quantization]
    tensors = load_file(str(art / "rank-0/model.safetensors"))
    assert all(t.dtype == want for t in tensors.values())
    assert manifest.dtype == {"bf16": "bfloat16", "fp16": "float16"}[quantization]
    assert json.loads((art / "config.json").read_text())["torch_dtype"] == manifest.dtype
    out = greedy(art, 8)
    assert all(len(o) == 8 for o in out)


@pytest.mark.parametrize(("quantization", "dtype", "method"), [
    ("fp8", torch.float8_e4m3fn, "fp8"), ("int8-weight", torch.int8, "int8"),
])  # fmt: skip
def test_quantized_builds(
    checkpoint: Path, tmp_path: Path, quantization: str, dtype: torch.dtype, method: str
) -> None:
    art, _ = build(checkpoint, tmp_path / quantization, quantization=quantization, measure_capacity=False)
    verify_artifact(art)
    config = json.loads((art / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == method
    tensors = load_file(str(art / "rank-0/model.safetensors"))
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    scale = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    assert q.dtype == dtype and scale.shape == (q.shape[0],)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # not quantized
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    # the dequantized weight is close to the original
    original = load_checkpoint_tensor(checkpoint, "model.layers.0.self_attn.q_proj.weight")
    rel = ((q.float() * scale[:, None]) - original).abs().max() / original.abs().max()
    assert rel < 0.07
    # and the engine serves it
    out = greedy(art, 8)
    assert all(len(o) == 8 for o in out)


def load_checkpoint_tensor(checkpoint: Path, name: str) -> torch.Tensor:
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():  # noqa: SIM118
                return st.get_tensor(name)
    raise KeyError(name)


def test_tp2_shards_reassemble_to_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    art, _ = build(checkpoint, tmp_path / "tp2", tensor_parallel_size=2, measure_capacity=False)
    manifest = verify_artifact(art)
    assert manifest.tensor_parallel_size == 2 and manifest.capacity is None
    assert manifest.weight_files == {"0": ["rank-0/model.safetensors"], "1": ["rank-1/model.safetensors"]}
    r0 = load_file(str(art / "rank-0/model.safetensors"))
    r1 = load_file(str(art / "rank-1/model.safetensors"))
    assert r0.keys() == r1.keys()
    split = 0
    for name in r0:
        original = load_checkpoint_tensor(checkpoint, name)
        dim = tp_shard_dim(name)
        if dim is None:
            assert torch.equal(r0[name], original) and torch.equal(r1[name], original)
            continue
        split += 1
        assert r0[name].shape[dim] < original.shape[dim]
        assert torch.equal(torch.cat([r0[name], r1[name]], dim=dim), original), name
    assert split >= 7 * 2  # q/k/v/o/gate/up/down of both layers at least


def test_pp2_records_stages_and_splits_layers(checkpoint: Path, tmp_path: Path) -> None:
    art, _ = build(checkpoint, tmp_path / "pp2", pipeline_parallel_size=2, measure_capacity=False)
    manifest = verify_artifact(art)
    stages = [(s.stage, s.first_layer, s.end_layer, s.ranks) for s in manifest.pipeline_stages]
    assert stages == [(0, 0, 1, [0]), (1, 1, 2, [1])]
    r0 = load_file(str(art / "rank-0/model.safetensors"))
    r1 = load_file(str(art / "rank-1/model.safetensors"))
    assert "model.embed_tokens.weight" in r0 and "model.embed_tokens.weight" not in r1
    assert "lm_head.weight" in r1 and "model.norm.weight" in r1 and "lm_head.weight" not in r0
    assert all(".layers.1." not in n for n in r0) and all(".layers.0." not in n for n in r1)


def test_corrupted_or_missing_files_fail_verification(checkpoint: Path, tmp_path: Path) -> None:
    art, _ = build(checkpoint, tmp_path / "art", measure_capacity=False)
    verify_artifact(art)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(art), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"] is True
    weights = art / "rank-0/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # flip bits, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="sha256"):
        verify_artifact(art)
    bad = runner.invoke(main, ["verify", str(art)])
    assert bad.exit_code == 1 and "rank-0/model.safetensors" in bad.output
    (art / "tokenizer.json").unlink()
    with pytest.raises(VerificationError, match=r"tokenizer\.json: missing"):
        verify_artifact(art)
    (art / "extra.bin").write_bytes(b"x")
    with pytest.raises(VerificationError, match=r"extra\.bin: not in the manifest"):
        verify_artifact(art)


def test_interrupted_build_leaves_no_artifact(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "kiln_engine.cli", "build", "--model", str(checkpoint), "--output", str(out),
           "--device", "cpu", "--no-progress-bar", "--max-batch-size", "64"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        payload = parse_line(line)
        if payload is not None:
            seen.append(payload["step"])
            if payload["step"] == "capacity":  # weights written, manifest not yet
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(30)
    assert "capacity" in seen and proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed build must not leave an artifact at the output path"
    partial = list(tmp_path.glob(".artifact.partial-*"))
    assert partial and not (partial[0] / "manifest.json").exists()
    # serving refuses it; the next build cleans up and publishes
    from kiln_engine.backends.torch import resolve_artifact
    from kiln_engine.build.source import SourceError

    with pytest.raises(SourceError, match="not a finished Kiln artifact"):
        resolve_artifact(str(partial[0]))
    args = [
        "build",
        "--model",
        str(checkpoint),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--no-measure-capacity",
    ]
    result = CliRunner().invoke(main, [*args, "--no-progress-bar"])
    assert result.exit_code == 0, result.output
    verify_artifact(out)
    assert not list(tmp_path.glob(".artifact.partial-*"))


def test_rebuild_of_an_identical_artifact_is_a_no_op(checkpoint: Path, tmp_path: Path) -> None:
    art, _ = build(checkpoint, tmp_path / "art", measure_capacity=False)
    before = read_manifest(art).created_at
    mtime = (art / "manifest.json").stat().st_mtime_ns
    time.sleep(0.01)
    _, progress = build(checkpoint, tmp_path / "art", measure_capacity=False)
    assert (art / "manifest.json").stat().st_mtime_ns == mtime and read_manifest(art).created_at == before
    assert progress[-1]["step"] == "done" and "already present" in progress[-1]["message"]


def test_pvc_uris_map_under_the_mount_root(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "pvc"
    (root / "models").mkdir(parents=True)
    (root / "models" / "tiny").symlink_to(checkpoint, target_is_directory=True)
    monkeypatch.setenv("KILN_PVC_ROOT", str(root))
    published, _ = build("pvc://models/tiny", "pvc://engines/abc123", measure_capacity=False)
    assert published == root / "engines" / "abc123"
    verify_artifact(published)


def test_build_errors_are_clear(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="int4-awq loads checkpoints published in AWQ"):
        build(checkpoint, tmp_path / "a", quantization="int4-awq", measure_capacity=False)
    with pytest.raises(BuildError, match="does not exist"):
        build(tmp_path / "nope", tmp_path / "b", measure_capacity=False)
    with pytest.raises(BuildError, match=r"not divisible|does not split"):
        build(checkpoint, tmp_path / "c", tensor_parallel_size=3, measure_capacity=False)
    weird = make_tiny_checkpoint(tmp_path / "weird", "llama")
    cfg = json.loads((weird / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (weird / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BuildError, match="supported: LlamaForCausalLM"):
        build(weird, tmp_path / "d", measure_capacity=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    result = CliRunner().invoke(main, ["build", "--model", str(weird), "--output", str(tmp_path / "e")])
    assert result.exit_code == 1 and "KILN_PROGRESS" in result.output and '"step":"failed"' in result.output


def test_result_file_on_success_matches_the_manifest(checkpoint: Path, tmp_path: Path) -> None:
    from kiln_engine.build.manifest import sha256_file

    out, res = tmp_path / "art", tmp_path / "termination-log"
    args = ["build", "--model", str(checkpoint), "--output", str(out), "--device", "cpu",
            "--max-batch-size", "2", "--ttft-target-ms", "250", "--result-file", str(res),
            "--no-progress-bar"]  # fmt: skip
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    raw = res.read_bytes()
    assert len(raw) < 4096
    result = json.loads(raw)
    manifest = verify_artifact(out)
    assert result["ok"] is True and result["artifact"] == str(out)
    assert result["manifestSha256"] == sha256_file(out / "manifest.json")
    assert result["runtimeVersion"] == manifest.runtime.version and result["gpuArch"] == "cpu"
    cap = manifest.capacity
    assert cap is not None and result["capacity"] == {
        "tokensPerSecond": cap.output_tokens_per_second,
        "maxConcurrency": cap.max_concurrency_at_ttft_target,
        "ttftTargetMs": 250.0,
        "ttftPercentile": cap.ttft_percentile,
    }
    # a rebuild that finds the same artifact reports it just the same
    res.unlink()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already present" in again.output
    assert json.loads(res.read_text()) == result


@pytest.mark.parametrize(
    ("make", "reason", "message"),
    [
        (lambda tmp: tmp / "missing", "CheckpointNotFound", "does not exist"),
        (lambda tmp: make_tiny_checkpoint(tmp / "gpt2", "llama", architectures=["GPT2LMHeadModel"]),
         "UnsupportedArchitecture", "supported: LlamaForCausalLM"),
        (lambda tmp: _without_weights(make_tiny_checkpoint(tmp / "noweights", "llama")), "InvalidCheckpoint",
         "no \\*.safetensors"),
    ],
)  # fmt: skip
def test_result_file_on_failure_names_the_reason(
    tmp_path: Path, make: object, reason: str, message: str
) -> None:
    src = make(tmp_path)  # type: ignore[operator]
    res = tmp_path / "termination-log"
    run = CliRunner().invoke(
        main, ["build", "--model", str(src), "--output", str(tmp_path / "o"), "--result-file", str(res)]
    )
    assert run.exit_code == 1
    result = json.loads(res.read_text())
    assert result["ok"] is False and result["reason"] == reason
    assert re.search(message, result["message"]), result["message"]
    failed = [p for p in map(parse_line, run.output.splitlines()) if p and p["step"] == "failed"]
    assert failed and failed[0]["reason"] == reason and failed[0]["failed_step"] in ("fetch", "load")
    assert not (tmp_path / "o").exists()


def _without_weights(path: Path) -> Path:
    for f in path.glob("*.safetensors"):
        f.unlink()
    return path


def test_tensorrt_llm_build_without_it_fails_early_with_a_reason(checkpoint: Path, tmp_path: Path) -> None:
    from kiln_engine.backends import tensorrt_llm as trt

    if trt.available():
        pytest.skip("TensorRT-LLM is installed here")
    res = tmp_path / "result.json"
    run = CliRunner().invoke(main, ["build", "--backend", "tensorrt-llm", "--model", str(checkpoint),
                                    "--output", str(tmp_path / "o"), "--result-file", str(res)])  # fmt: skip
    assert run.exit_code == 1
    result = json.loads(res.read_text())
    assert result["reason"] == "BackendUnavailable" and "not installed" in result["message"]
    assert "Dockerfile.tensorrt-llm" in result["message"]
    steps = [p["step"] for p in map(parse_line, run.output.splitlines()) if p]
    assert steps == ["failed"], "nothing is fetched before the backend is known to be there"


def test_fp8_per_tensor_scales(checkpoint: Path, tmp_path: Path) -> None:
    art, _ = build(
        checkpoint, tmp_path / "fp8t", quantization="fp8", fp8_scales="tensor", measure_capacity=False
    )
    config = json.loads((art / "config.json").read_text())
    assert config["quantization_config"]["weight_scheme"] == "tensor"
    tensors = load_file(str(art / "rank-0/model.safetensors"))
    q = tensors["model.layers.0.mlp.down_proj.weight"]
    scale = tensors["model.layers.0.mlp.down_proj.weight_scale"]
    assert q.dtype == torch.float8_e4m3fn and scale.numel() == 1
    original = load_checkpoint_tensor(checkpoint, "model.layers.0.mlp.down_proj.weight")
    assert ((q.float() * scale) - original).abs().max() / original.abs().max() < 0.07
    assert all(len(o) == 8 for o in greedy(art, 8))


def test_fp8_tp2_scales_match_the_unsharded_build(checkpoint: Path, tmp_path: Path) -> None:
    whole, _ = build(checkpoint, tmp_path / "w", quantization="fp8", measure_capacity=False)
    split, _ = build(
        checkpoint, tmp_path / "s", quantization="fp8", tensor_parallel_size=2, measure_capacity=False
    )
    w = load_file(str(whole / "rank-0/model.safetensors"))
    r = [load_file(str(split / f"rank-{i}/model.safetensors")) for i in range(2)]
    for name in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate_proj"):
        dim = tp_shard_dim(name + ".weight")
        assert dim is not None
        joined = torch.cat([r[0][name + ".weight"].float(), r[1][name + ".weight"].float()], dim=dim)
        assert torch.equal(joined, w[name + ".weight"].float()), name
        scale_dim = tp_shard_dim(name + ".weight_scale")
        scales = [r[0][name + ".weight_scale"], r[1][name + ".weight_scale"]]
        joined_scale = scales[0] if scale_dim is None else torch.cat(scales, dim=scale_dim)
        assert torch.equal(joined_scale, w[name + ".weight_scale"]), name


def test_sigterm_stops_the_build_cleanly(checkpoint: Path, tmp_path: Path) -> None:
    out, res = tmp_path / "artifact", tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "kiln_engine.cli", "build", "--model", str(checkpoint), "--output", str(out),
           "--device", "cpu", "--no-progress-bar", "--max-batch-size", "64",
           "--result-file", str(res)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        payload = parse_line(line)
        if payload is not None and payload["step"] == "capacity":
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(60) == 1, rest
    result = json.loads(res.read_text())
    assert result == {"ok": False, "reason": "Interrupted", "message": "interrupted by signal SIGTERM"}
    assert not out.exists() and not list(tmp_path.glob(".artifact.*")), (
        "partial and capacity dirs are removed"
    )


def test_hf_source_from_the_hub_cache(checkpoint: Path, tmp_path: Path) -> None:
    """hf://org/name@rev goes through huggingface_hub.snapshot_download (offline here: its cache layout)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "work" / "hf" / "models--kiln--tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out, res = tmp_path / "art", tmp_path / "result.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "KILN_WORK_DIR": str(tmp_path / "work"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "kiln_engine.cli", "build", "--model", "hf://kiln/tiny@main",
           "--output", str(out), "--no-measure-capacity", "--no-progress-bar",
           "--result-file", str(res)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = verify_artifact(out)
    assert manifest.source == "hf://kiln/tiny@main" and json.loads(res.read_text())["ok"] is True
    assert greedy(out, 4) == greedy(checkpoint, 4)
    cmd[cmd.index("hf://kiln/tiny@main")] = "hf://kiln/absent"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and json.loads(res.read_text())["reason"] in (
        "CheckpointNotFound",
        "FetchFailed",
    )


@pytest.mark.parametrize(
    ("status", "error_code", "token", "reason", "message"),
    [
        (401, "RepoNotFound", True, "Unauthorized", "rejected the credentials"),
        (403, "GatedRepo", True, "Unauthorized", "rejected the credentials"),
        (401, "RepoNotFound", False, "Unauthorized", "without credentials"),
        (404, "RepoNotFound", True, "CheckpointNotFound", "repository not found"),
    ],
)  # fmt: skip
def test_a_hub_that_refuses_the_credentials_is_unauthorized(
    tmp_path: Path, status: int, error_code: str, token: bool, reason: str, message: str
) -> None:
    """401/403 from the hub (a loopback stand-in) is `Unauthorized`, never `CheckpointNotFound`, and
    neither the result file nor the output carries the token, which did reach the hub."""
    from tests.reliability.fake_hub import FakeHub, serving

    secret = "hf_" + os.urandom(16).hex()
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
            "KILN_WORK_DIR": str(tmp_path / "work")}  # fmt: skip
    if token:
        env["HF_TOKEN"] = secret
    res = tmp_path / "result.json"
    with serving(FakeHub(status, error_code)) as hub:
        env["HF_ENDPOINT"] = hub.url
        cmd = [sys.executable, "-m", "kiln_engine.cli", "build", "--model", "hf://acme/private-model",
               "--output", str(tmp_path / "never"), "--no-measure-capacity", "--no-progress-bar",
               "--result-file", str(res)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(res.read_text())
    assert result["ok"] is False and result["reason"] == reason, result
    assert message in result["message"], result
    assert hub.authorizations, "the build never asked the hub, so this test proves nothing"
    assert any(secret in a for a in hub.authorizations) == token, hub.authorizations
    assert secret not in res.read_text() + proc.stdout + proc.stderr
    assert not (tmp_path / "never").exists()


def make_int4_checkpoint(base: Path, out: Path, method: str, group: int) -> Path:
    """`base` with every decoder Linear as random int4 weights, packed as AutoAWQ or GPTQ publish them."""
    import numpy as np
    from safetensors.torch import save_file

    from kiln_engine.quantization import is_quantizable
    from tests.engine.test_quantization import pack_awq_cols, pack_gptq_cols, pack_gptq_rows, random_int4

    out.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(sorted(load_file(str(base / "model.safetensors")))):
        w = load_checkpoint_tensor(base, name)
        if not is_quantizable(name):
            tensors[name] = w
            continue
        out_f, in_f = w.shape
        q, z, s = random_int4(in_f, out_f, group, seed=i)
        prefix = name.removesuffix("weight")
        tensors[prefix + "scales"] = s
        if method == "awq":
            tensors[prefix + "qweight"], tensors[prefix + "qzeros"] = pack_awq_cols(q), pack_awq_cols(z)
        else:
            tensors[prefix + "qweight"], tensors[prefix + "qzeros"] = pack_gptq_rows(q), pack_gptq_cols(z - 1)
            tensors[prefix + "g_idx"] = torch.from_numpy(np.arange(in_f) // group).int()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / f).write_bytes((base / f).read_bytes())
    return out


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_checkpoints_are_loaded_as_published(tmp_path: Path, method: str) -> None:
    base = make_tiny_checkpoint(tmp_path / "base", "llama", seed=5)
    ckpt = make_int4_checkpoint(base, tmp_path / method, method, group=16)
    quantization = f"int4-{method}"
    art, _ = build(ckpt, tmp_path / "tp1", quantization=quantization, measure_capacity=False)
    assert verify_artifact(art).quantization == quantization
    assert json.loads((art / "config.json").read_text())["quantization_config"]["quant_method"] == method
    assert greedy(art, 8) == greedy(ckpt, 8)
    tp2, _ = build(
        ckpt, tmp_path / "tp2", quantization=quantization, tensor_parallel_size=2, measure_capacity=False
    )
    r0 = load_file(str(tp2 / "rank-0/model.safetensors"))
    r1 = load_file(str(tp2 / "rank-1/model.safetensors"))
    split = 0
    for name in r0:
        original = load_checkpoint_tensor(ckpt, name)
        dim = tp_shard_dim(name)
        if dim is None:
            assert torch.equal(r0[name], original) and torch.equal(r1[name], original), name
            continue
        split += 1
        assert torch.equal(torch.cat([r0[name], r1[name]], dim=dim), original), name
    assert split >= 7 * 2 * 3  # qweight, qzeros and scales of q/k/v/o/gate/up/down in both layers
    # one input group for o_proj (64 inputs, group 64) cannot be split over two ranks: said up front
    coarse = make_int4_checkpoint(base, tmp_path / f"{method}-g64", method, group=64)
    with pytest.raises(BuildError, match="o_proj has 1 input groups, not divisible by 2") as e:
        build(
            coarse,
            tmp_path / "bad",
            quantization=quantization,
            tensor_parallel_size=2,
            measure_capacity=False,
        )
    assert e.value.reason == "InvalidOptions" and not (tmp_path / "bad").exists()


def test_a_draft_model_rides_in_the_artifact_and_serves_speculation(checkpoint: Path, tmp_path: Path) -> None:
    draft = make_tiny_checkpoint(tmp_path / "draft", "llama", seed=3, num_hidden_layers=1)
    art, progress = build(checkpoint, tmp_path / "art", measure_capacity=False, draft_model=str(draft))
    manifest = verify_artifact(art)  # the draft's files are checksummed with the rest
    assert {"draft/config.json", "draft/tokenizer.json", "draft/model.safetensors"} <= {
        f.path for f in manifest.files
    }
    assert any("draft model" in p["message"] for p in progress)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    config = EngineConfig(
        device="cpu", max_model_len=256, speculative="draft", draft_model=str(art / "draft")
    )
    engine = LLMEngine(art, config)
    assert engine.generate(PROMPTS, params) == greedy(checkpoint)
    assert engine.stats().spec_proposed_tokens_total > 0
    # The same build again is reused; another draft is another artifact.
    again, _ = build(checkpoint, tmp_path / "art", measure_capacity=False, draft_model=str(draft))
    assert verify_artifact(again).created_at == manifest.created_at
    other = make_tiny_checkpoint(tmp_path / "other", "llama", seed=4, num_hidden_layers=1)
    rebuilt, _ = build(checkpoint, tmp_path / "art", measure_capacity=False, draft_model=str(other))
    assert verify_artifact(rebuilt).source_fingerprint != manifest.source_fingerprint


def test_an_eagle_head_rides_in_the_artifact_as_safetensors(checkpoint: Path, tmp_path: Path) -> None:
    """EAGLE's own heads ship pytorch_model.bin: the build reads it with torch's tensors-only
    unpickler and carries safetensors; the artifact serves `--speculative eagle` and refuses the head
    as a draft model."""
    import torch

    head = make_tiny_eagle_head(tmp_path / "head", checkpoint, seed=3)
    torch.save(load_file(str(head / "model.safetensors")), head / "pytorch_model.bin")
    (head / "model.safetensors").unlink()
    art, _ = build(checkpoint, tmp_path / "art", measure_capacity=False, draft_model=str(head))
    files = {f.path for f in verify_artifact(art).files}
    assert {
        "draft/config.json",
        "draft/model.safetensors",
    } <= files and "draft/pytorch_model.bin" not in files
    config = EngineConfig(
        device="cpu", max_model_len=256, speculative="eagle", draft_model=str(art / "draft")
    )
    engine = LLMEngine(art, config)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert engine.generate(PROMPTS, params) == greedy(checkpoint)
    assert engine.stats().spec_proposed_tokens_total > 0
    out = CliRunner().invoke(main, ["serve", "--artifact", str(art), "--speculative", "draft"])
    assert out.exit_code == 2 and "is an EAGLE head: serve it with --speculative eagle" in out.output
    wide = make_tiny_checkpoint(tmp_path / "wide", "llama", hidden_size=32, num_attention_heads=2)
    with pytest.raises(BuildError, match="hidden size 32") as failed:
        build(
            checkpoint,
            tmp_path / "art2",
            measure_capacity=False,
            draft_model=str(make_tiny_eagle_head(tmp_path / "h32", wide)),
        )
    assert failed.value.reason == INVALID_OPTIONS
    shallow = make_tiny_checkpoint(tmp_path / "shallow", "llama", num_hidden_layers=2)
    with pytest.raises(BuildError, match="at least 3 layers") as failed:
        build(
            shallow,
            tmp_path / "art3",
            measure_capacity=False,
            draft_model=str(make_tiny_eagle3_head(tmp_path / "h3", shallow)),
        )
    assert failed.value.reason == INVALID_OPTIONS


def test_a_draft_with_another_tokenizer_fails_the_build(checkpoint: Path, tmp_path: Path) -> None:
    import json
    import shutil

    bad = shutil.copytree(checkpoint, tmp_path / "bad")
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [name for name in vocab if name.isalpha()][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(BuildError, match="tokenizer differs") as failed:
        build(checkpoint, tmp_path / "art", measure_capacity=False, draft_model=str(bad))
    assert failed.value.reason == INVALID_OPTIONS
    with pytest.raises(BuildError, match="one rank"):
        build(checkpoint, tmp_path / "art2", draft_model=str(checkpoint), tensor_parallel_size=2)
