"""CRD generation: the pydantic API models rendered as apiextensions.k8s.io/v1 CustomResourceDefinitions.

`kiln crds generate` writes them to `crds/` (and the Helm chart's `crds/`); `--check` fails when
the files on disk differ from what the models say, so nobody edits generated YAML by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import BaseModel

from kiln.api import v1alpha1 as api
from kiln.paths import crds_dir, repo_root

Schema = dict[str, Any]

# JSON-schema keywords a CRD's structural schema does not accept, or that pydantic adds for Python only.
_DROPPED_KEYWORDS = {"title", "examples", "$defs"}


def _resolve_ref(ref: str, definitions: dict[str, Schema]) -> Schema:
    name = ref.removeprefix("#/$defs/")
    return copy.deepcopy(definitions[name])


def to_structural(schema: Schema, definitions: dict[str, Schema]) -> Schema:
    """Turn one pydantic JSON-schema node into a Kubernetes structural schema node.

    Inlines $refs, folds `Optional[X]` (anyOf X|null) into X, turns `const` into a one-value
    enum, drops keywords CRDs reject, and keeps Kubernetes extensions (x-kubernetes-*).
    """
    node = copy.deepcopy(schema)
    if "$ref" in node:
        target = _resolve_ref(node.pop("$ref"), definitions)
        target.update(node)  # field-level description/default override the model's own
        node = target
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"only Optional[X] unions are supported in the API, got {variants}")
        variant = to_structural(variants[0], definitions)
        variant.update(node)  # the field's description/default win over the type's
        node = variant
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = to_structural(node.pop("allOf")[0], definitions)
        inner.update(node)
        node = inner
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if node.get("default", 0) is None:
        del node["default"]
    for keyword in _DROPPED_KEYWORDS:
        node.pop(keyword, None)

    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    additional = node.get("additionalProperties")
    if node.get("type") == "object":
        if additional is True or (additional is None and "properties" not in node and not preserve):
            # dict[str, Any]: free-form objects (pod template pieces, EnvVar, Toleration).
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
        elif additional is False or preserve:
            node.pop("additionalProperties", None)
        elif isinstance(additional, dict):
            node["additionalProperties"] = to_structural(additional, definitions)
    if "properties" in node:
        node["properties"] = {
            name: to_structural(child, definitions) for name, child in node["properties"].items()
        }
    if "items" in node:
        node["items"] = to_structural(node["items"], definitions)
    if node.get("format") == "date-time":
        node["type"] = "string"
    return node


def object_schema(model: type[BaseModel]) -> Schema:
    """The structural schema of one API model, with defaults for nested objects filled in."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.get("$defs", {})
    structural = to_structural(raw, definitions)
    _default_nested_objects(model, structural)
    return structural


def _default_nested_objects(model: type[BaseModel], schema: Schema) -> None:
    """Give fields built by default_factory their full default object.

    Kubernetes only defaults a nested object's fields when the object itself is present, and it
    checks a default against the object's CEL rules as written, so the default must be the
    complete object (as kubebuilder's `+default={...}` markers are), not `{}`.
    """
    for name, field in model.model_fields.items():
        alias = field.alias or name
        child = schema.get("properties", {}).get(alias)
        if child is None:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if field.default_factory is not None:
                child["default"] = field.get_default(call_default_factory=True).model_dump(
                    by_alias=True, exclude_none=True, mode="json"
                )
            _default_nested_objects(annotation, child)


def _printer_column(
    name: str, json_path: str, type_: str = "string", description: str = "", priority: int = 0
) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": type_, "jsonPath": json_path}
    if description:
        column["description"] = description
    if priority:
        column["priority"] = priority
    return column


def _crd(
    kind: str,
    plural: str,
    short_names: list[str],
    model: type[BaseModel],
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    columns: list[dict[str, Any]],
    scale: dict[str, str] | None,
) -> dict[str, Any]:
    spec_schema = object_schema(spec_model)
    status_schema = object_schema(status_model)
    spec_schema.setdefault("description", spec_model.__doc__ or "")
    status_schema.setdefault("description", status_model.__doc__ or "")
    status_schema.pop("required", None)
    root: Schema = {
        "type": "object",
        "description": (model.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object (kiln.dev/v1alpha1)."},
            "kind": {"type": "string", "description": f"Kind of this object ({kind})."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        subresources["scale"] = scale
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kiln", "app.kubernetes.io/part-of": "kiln"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["kiln"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def llmdeployment_crd() -> dict[str, Any]:
    """The LLMDeployment CRD, with the scale subresource so `kubectl scale` and HPA/KEDA work."""
    columns = [
        _printer_column("Model", ".spec.model.source", description="Checkpoint URI."),
        _printer_column("Quant", ".spec.engine.quantization", description="Weight format."),
        _printer_column("TPxPP", ".status.layout", description="Tensor x pipeline parallelism."),
        _printer_column("Ready", ".status.readyReplicas", "integer", "Replicas ready to serve."),
        _printer_column("Desired", ".spec.replicas", "integer", "Desired replicas."),
        _printer_column("Phase", ".status.phase", description="Lifecycle phase."),
        _printer_column("TTFT-p50(ms)", ".status.ttftP50Ms", "number", "Observed median TTFT."),
        _printer_column("Engine", ".status.engine.name", description="LLMEngine in use.", priority=1),
        _printer_column(
            "Routers", ".status.routerReadyReplicas", "integer", "Kiln routers ready.", priority=1
        ),
        _printer_column("Age", ".metadata.creationTimestamp", "date"),
    ]
    scale = {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    return _crd(
        "LLMDeployment",
        "llmdeployments",
        ["llmd"],
        api.LLMDeployment,
        api.LLMDeploymentSpec,
        api.LLMDeploymentStatus,
        columns,
        scale,
    )


def llmengine_crd() -> dict[str, Any]:
    """The LLMEngine CRD."""
    columns = [
        _printer_column("Model", ".spec.model.source", description="Checkpoint URI."),
        _printer_column("Quant", ".spec.quantization", description="Weight format."),
        _printer_column("TP", ".spec.parallelism.tensor", "integer", "Tensor parallelism."),
        _printer_column("PP", ".spec.parallelism.pipeline", "integer", "Pipeline parallelism."),
        _printer_column("Arch", ".spec.gpuArch", description="GPU architecture."),
        _printer_column("Phase", ".status.phase", description="Lifecycle phase."),
        _printer_column("Progress", ".status.progress", "integer", "Build progress, %."),
        _printer_column("Users", ".status.users", "integer", "LLMDeployments using it.", priority=1),
        _printer_column("Age", ".metadata.creationTimestamp", "date"),
    ]
    return _crd(
        "LLMEngine",
        "llmengines",
        ["llme"],
        api.LLMEngine,
        api.LLMEngineSpec,
        api.LLMEngineStatus,
        columns,
        None,
    )


def render_all() -> dict[str, str]:
    """File name → YAML text of every CRD."""
    header = "# Generated by `kiln crds generate` from operator/kiln/api. Do not edit.\n"
    files = {}
    for crd in (llmdeployment_crd(), llmengine_crd()):
        name = f"{api.GROUP}_{crd['spec']['names']['plural']}.yaml"
        files[name] = header + yaml.safe_dump(crd, sort_keys=False, width=100)
    return files


def reference_markdown() -> str:
    """A field-by-field reference of both kinds, generated from the same schemas as the CRDs."""
    lines = [
        "# API reference (kiln.dev/v1alpha1)",
        "",
        "Generated by `kiln crds generate` from `operator/kiln/api/v1alpha1.py`. Do not edit.",
        "`kubectl explain llmdeployment.spec` shows the same text in the cluster.",
    ]
    for crd in (llmdeployment_crd(), llmengine_crd()):
        kind = crd["spec"]["names"]["kind"]
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        lines += ["", f"## {kind}", "", root["description"], ""]
        for section in ("spec", "status"):
            lines += [
                f"### {kind}.{section}",
                "",
                "| field | type | default | description |",
                "| --- | --- | --- | --- |",
            ]
            lines += _reference_rows(root["properties"][section], section)
            lines.append("")
            rules = _collect_rules(root["properties"][section], section)
            if rules:
                lines += [f"Validation rules on `{section}` (CEL, enforced by the API server):", ""]
                lines += [f"- `{path}`: {message}" for path, message in rules]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _type_name(node: Schema) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{value}`" for value in node["enum"])
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    if node.get("type") == "array":
        return f"list of {_type_name(node.get('items', {}))}"
    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type_name(node['additionalProperties'])}"
    return str(node.get("format") or node.get("type", "object"))


def _reference_rows(node: Schema, path: str) -> list[str]:
    rows = []
    for name, child in node.get("properties", {}).items():
        child_path = f"{path}.{name}"
        default = child.get("default")
        shown_default = "" if default is None or default == {} else f"`{json.dumps(default)}`"
        bounds = [f"{key} {child[key]}" for key in ("minimum", "maximum") if key in child]
        description = " ".join(child.get("description", "").split())
        if bounds:
            description += f" ({', '.join(bounds)})"
        rows.append(f"| `{child_path}` | {_type_name(child)} | {shown_default} | {description} |")
        rows += _reference_rows(child, child_path)
        if child.get("type") == "array" and "properties" in child.get("items", {}):
            rows += _reference_rows(child["items"], child_path + "[]")
    return rows


def _collect_rules(node: Schema, path: str) -> list[tuple[str, str]]:
    rules = [(path, rule["message"]) for rule in node.get("x-kubernetes-validations", [])]
    for name, child in node.get("properties", {}).items():
        rules += _collect_rules(child, f"{path}.{name}")
    return rules


def reference_path() -> Path | None:
    """docs/api-reference.md in a checkout; None when installed from a wheel."""
    root = repo_root()
    return root / "docs" / "api-reference.md" if root else None


def output_dirs() -> list[Path]:
    """`crds/`, plus the Helm chart's `crds/` when the chart is in this checkout."""
    dirs = [crds_dir()]
    root = repo_root()
    if root and (root / "charts" / "kiln" / "Chart.yaml").is_file():
        dirs.append(root / "charts" / "kiln" / "crds")
    return dirs


def stale_files(files: dict[str, str], directory: Path) -> list[str]:
    """Names of generated files that are missing or differ in `directory`, plus unexpected ones."""
    stale = [
        name
        for name, text in files.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
    if directory.is_dir():
        stale += [p.name for p in directory.glob("*.yaml") if p.name not in files]
    return sorted(stale)


@click.group()
def crds() -> None:
    """Kiln's CustomResourceDefinitions."""


@crds.command()
@click.option("--check", is_flag=True, help="Fail if the files on disk are stale instead of writing.")
def generate(check: bool) -> None:
    """Generate crds/ from the API models."""
    files = render_all()
    problems = []
    for directory in output_dirs():
        stale = stale_files(files, directory)
        if check:
            problems += [f"{directory / name}" for name in stale]
            continue
        directory.mkdir(parents=True, exist_ok=True)
        for name in stale:
            path = directory / name
            if name in files:
                path.write_text(files[name])
                click.echo(f"wrote {path}")
            else:
                path.unlink()
                click.echo(f"removed {path}")
    reference = reference_path()
    if reference is not None:
        text = reference_markdown()
        current = reference.read_text() if reference.is_file() else None
        if current != text and check:
            problems.append(str(reference))
        elif current != text:
            reference.parent.mkdir(parents=True, exist_ok=True)
            reference.write_text(text)
            click.echo(f"wrote {reference}")
    if problems:
        raise click.ClickException(
            "generated CRDs are stale (run `kiln crds generate`):\n  " + "\n  ".join(problems)
        )
    if check:
        click.echo("CRDs are up to date.")


@crds.command()
def show() -> None:
    """Print the CRDs as YAML (for `kubectl apply -f -`)."""
    click.echo("---\n".join(render_all().values()), nl=False)
