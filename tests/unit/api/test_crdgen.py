"""CRD generation: structural schemas, CEL rules, printer columns, subresources, freshness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kiln.api import crdgen
from kiln_engine.build import pipeline as build_pipeline


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, child in node.get("properties", {}).items():
            found += walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            found += walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            found += walk(node["additionalProperties"], f"{path}{{}}")
    return found


def deployment_schema() -> dict[str, Any]:
    crd = crdgen.llmdeployment_crd()
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural() -> None:
    for crd in (crdgen.llmdeployment_crd(), crdgen.llmengine_crd()):
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in walk(root):
            assert not {"$ref", "anyOf", "allOf", "oneOf", "title", "$defs", "const"} & node.keys(), path
            preserve = node.get("x-kubernetes-preserve-unknown-fields")
            assert "type" in node or preserve, f"{path} has no type"
            if "properties" in node:
                assert "additionalProperties" not in node, path


def test_every_spec_field_is_documented() -> None:
    spec = deployment_schema()["properties"]["spec"]
    undocumented = [path for path, node in walk(spec) if path and not node.get("description")]
    # Items of lists and values of maps inherit their field's description.
    undocumented = [p for p in undocumented if not p.endswith(("[]", "{}"))]
    assert undocumented == []


def test_nested_sections_default_so_inner_defaults_apply() -> None:
    spec = deployment_schema()["properties"]["spec"]["properties"]
    for section in ("engine", "parallelism", "autoscaling", "serving", "build"):
        assert spec[section]["default"], section
    assert spec["engine"]["properties"]["backend"]["default"] == "torch"
    # the contract with the build Job: every quantization the CRD admits is one `kiln-engine build`
    # takes, and the other way round
    assert spec["engine"]["properties"]["quantization"]["enum"] == list(build_pipeline.QUANTIZATIONS)


def test_cross_field_rules_are_cel() -> None:
    spec = deployment_schema()["properties"]["spec"]
    rules = {v["rule"] for _, node in walk(spec) for v in node.get("x-kubernetes-validations", [])}
    joined = " ".join(rules)
    assert "self.minReplicas <= self.maxReplicas" in joined
    assert "self.tensor in [1, 2, 4, 8, 16, 32, 64]" in joined
    assert "self.tensor * self.pipeline" in joined
    assert "self.quantization in" in joined
    for _, node in walk(spec):
        for validation in node.get("x-kubernetes-validations", []):
            assert validation["message"]


def test_subresources_and_columns() -> None:
    version = crdgen.llmdeployment_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:7] == ["Model", "Quant", "TPxPP", "Ready", "Desired", "Phase", "TTFT-p50(ms)"]
    engine = crdgen.llmengine_crd()["spec"]["versions"][0]
    assert "scale" not in engine["subresources"]


def test_committed_crds_are_fresh() -> None:
    files = crdgen.render_all()
    for directory in crdgen.output_dirs():
        assert crdgen.stale_files(files, directory) == [], f"run `kiln crds generate` ({directory})"


def test_stale_files_detects_edits(tmp_path: Path) -> None:
    files = crdgen.render_all()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert crdgen.stale_files(files, tmp_path) == []
    edited = next(iter(files))
    (tmp_path / edited).write_text(files[edited].replace("Checkpoint", "checkpoint"))
    (tmp_path / "extra.yaml").write_text("{}")
    assert crdgen.stale_files(files, tmp_path) == sorted([edited, "extra.yaml"])
    assert yaml.safe_load(files[edited])["kind"] == "CustomResourceDefinition"


def test_reference_documents_every_spec_field() -> None:
    text = crdgen.reference_markdown()
    spec = deployment_schema()["properties"]["spec"]
    for path, _ in walk(spec, "spec"):
        if path.endswith(("[]", "{}")) or path == "spec":
            continue
        assert f"| `{path}` |" in text, path
    assert "`true`" in text  # defaults are shown as JSON, the way users write them
    assert "minReplicas must be <= maxReplicas" in text


def test_committed_reference_is_fresh() -> None:
    reference = crdgen.reference_path()
    assert reference is not None and reference.read_text() == crdgen.reference_markdown()
