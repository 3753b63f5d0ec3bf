"""The build's result for the operator: one JSON object (< 4 KiB) written to `--result-file`.

The build Job passes `--result-file /dev/termination-log`, so the object becomes the container's
`state.terminated.message`, which Kubernetes caps at 4096 bytes. Shapes (the Build Job contract):

    success {"ok": true, "artifact": URI, "manifestSha256": hex, "runtimeVersion": str,
             "gpuArch": str,
             "capacity": {"tokensPerSecond", "maxConcurrency", "ttftTargetMs", "ttftPercentile"} | null}
    failure {"ok": false, "reason": CamelCaseReason, "message": str}
    measured {"ok": true, "capacity": {...as above}, "measuredOn": str}  (`kiln-engine measure-capacity`)

Pure functions plus one small writer; no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln_engine.build.manifest import Capacity

MAX_BYTES = 4096
_ELLIPSIS = "…"


def success(
    uri: str, manifest_sha256: str, runtime_version: str, gpu_arch: str, capacity: Capacity | None
) -> dict[str, Any]:
    return {
        "ok": True,
        "artifact": uri,
        "manifestSha256": manifest_sha256,
        "runtimeVersion": runtime_version,
        "gpuArch": gpu_arch,
        "capacity": None if capacity is None else capacity_json(capacity),
    }


def capacity_json(capacity: Capacity) -> dict[str, Any]:
    return {
        "tokensPerSecond": float(capacity.output_tokens_per_second),
        "maxConcurrency": int(capacity.max_concurrency_at_ttft_target),
        "ttftTargetMs": float(capacity.ttft_target_ms),
        "ttftPercentile": int(capacity.ttft_percentile),
    }


def measured(capacity: Capacity) -> dict[str, Any]:
    """`kiln-engine measure-capacity`'s success: the same capacity shape as a build's."""
    return {"ok": True, "capacity": capacity_json(capacity), "measuredOn": capacity.measured_on}


def failure(reason: str, message: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "message": message}


def encode(result: dict[str, Any], limit: int = MAX_BYTES) -> str:
    """Compact JSON of `result` under `limit` bytes (UTF-8), shortening its `message` if it must."""
    text = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) < limit:
        return text
    message = str(result.get("message", ""))
    if not message:
        raise ValueError(f"result of {len(text.encode())} bytes has no message to shorten")
    overflow = len(text.encode()) - limit + 1
    keep = max(0, len(message.encode()) - overflow - len(_ELLIPSIS.encode()) - 8)
    while True:
        short = message.encode()[:keep].decode(errors="ignore") + _ELLIPSIS
        text = json.dumps({**result, "message": short}, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) < limit or keep == 0:
            return text
        keep = max(0, keep - 64)


def write(path: str | Path, result: dict[str, Any]) -> None:
    """Write the result; the termination log is a plain file the kubelet reads after exit."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(encode(result))
