"""GPU products: the CRD's fp8 KV-cache rule and `gpu_arch` agree on which GPUs have e4m3."""

from __future__ import annotations

from pathlib import Path

import celpy
import pytest
import yaml

from kiln.api.gpus import FP8_ARCHITECTURES, gpu_arch

ROOT = Path(__file__).resolve().parents[3]


PRODUCTS = [
    # Ada and newer (e4m3 in hardware)
    "NVIDIA-H100-80GB-HBM3",
    "NVIDIA-H200",
    "NVIDIA-GB200",
    "NVIDIA-L40S",
    "NVIDIA-L4",
    "NVIDIA-RTX-A6000-Ada",
    "NVIDIA-GeForce-RTX-4090",
    # older
    "NVIDIA-A100-SXM4-80GB",
    "NVIDIA-A10G",
    "NVIDIA-RTX-A6000",
    "Tesla-T4",
    "Tesla-V100-SXM2-16GB",
    "NVIDIA-A30",
    # unknown
    "Mystery-Accelerator-9000",
]


@pytest.mark.parametrize("product", PRODUCTS)
def test_the_crds_fp8_kv_rule_refuses_exactly_the_products_gpu_arch_puts_before_ada(product: str) -> None:
    """The CEL rule on spec (evaluated as the API server would, from the generated CRD) and
    `gpu_arch` agree: an fp8 KV cache is refused on a product exactly when its architecture is a
    known one older than sm89 (unknown products are left to the engine's own startup check)."""
    crd = yaml.safe_load((ROOT / "crds" / "kiln.dev_llmdeployments.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    [rule] = [r["rule"] for r in spec["x-kubernetes-validations"] if "fp8 KV cache" in r["message"]]
    env = celpy.Environment()
    value = {"gpu": {"product": product}, "engine": {"kvCacheDtype": "fp8"}}
    accepted = bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)}))
    arch = gpu_arch(product)
    assert accepted == (arch in FP8_ARCHITECTURES or arch.startswith("gpu-")), (product, arch)
