"""The GitOps docs carry the shipped health checks verbatim and an Application that leaves
autoscaler-owned replicas alone."""

from __future__ import annotations

import re
from typing import Any

import yaml
from kiln_chart import CHART, ROOT

GITOPS = ROOT / "docs" / "gitops.md"


def yaml_blocks(path: Any) -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def test_argocd_cm_in_the_docs_is_the_shipped_lua() -> None:
    config_maps = [doc for doc in yaml_blocks(GITOPS) if doc.get("kind") == "ConfigMap"]
    assert len(config_maps) == 1
    data = config_maps[0]["data"]
    for kind in ("LLMDeployment", "LLMEngine"):
        shipped = (CHART / "argocd" / "kiln.dev" / kind / "health.lua").read_text()
        assert data[f"resource.customizations.health.kiln.dev_{kind}"] == shipped, f"docs/gitops.md: {kind}"


def test_serving_application_ignores_autoscaler_owned_replicas() -> None:
    applications = {
        doc["metadata"]["name"]: doc for doc in yaml_blocks(GITOPS) if doc.get("kind") == "Application"
    }
    assert applications["kiln"]["spec"]["source"]["path"] == "charts/kiln"
    serving = applications["serving"]["spec"]
    ignore = next(d for d in serving["ignoreDifferences"] if d["kind"] == "LLMDeployment")
    assert ignore["group"] == "kiln.dev"
    assert ".spec.replicas" in ignore["jqPathExpressions"]
    assert ignore["managedFieldsManagers"] == ["kiln-autoscaler"]
    assert "RespectIgnoreDifferences=true" in serving["syncPolicy"]["syncOptions"]
