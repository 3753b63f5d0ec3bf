"""LLMDeployment specs for property tests: strategies derived from the pydantic API models, mutations
that break them the ways users do, and the oracle that says what the API server must do with each.

The oracle is the API models as the cluster sees them: strict pydantic validation of the JSON wire
form (aliases only; Kubernetes never coerces "5" to 5) plus the CEL rules the models carry in
`x-kubernetes-validations`, evaluated with a CEL interpreter on the defaulted object, exactly where
the generated CRD schema puts them.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import annotated_types
import celpy
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from kiln.api import v1alpha1 as api
from kiln.api.crdgen import object_schema

Spec = dict[str, Any]
FieldPath = tuple[str, ...]

# JSON values of every kind, to put where they do not belong.
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
# Kubernetes stores integers as int64; these are past what a field of any bound can hold.
HUGE_INTEGERS = st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63), -(2**64)])
BAD_SOURCES = st.sampled_from(
    [
        "",
        "http://example.com/model",
        "ftp://nowhere/model",
        "hf://org",
        "hf://org/",
        "hf:///name",
        "hf://org/name@",
        "hf://org/name@rev with space",
        "hf://org/name\n",
        " hf://org/name",
        "hf://-org/name",
        "hf://org/name/extra",
        "HF://org/name",
        "s3://B/prefix",
        "s3://ab",
        "s3://bucket_with_underscore/x",
        "pvc://Claim/path",
        "pvc://-claim",
        "pvc://claim-/x",
        "file:///etc/passwd",
        "../../etc/passwd",
        "hf://org/" + "n" * 1100,
        "s3://bucket/" + "p" * 1100,
    ]
)
NOT_POWERS_OF_TWO = st.integers(1, 64).filter(lambda n: n & (n - 1) != 0)


# ---------------------------------------------------------------------------------- model walk


@dataclass(frozen=True)
class Field:
    """One field of an API model, as it appears on the wire under `spec`."""

    path: FieldPath
    annotation: Any  # with `| None` removed
    nullable: bool
    required: bool
    ge: int | None = None
    le: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None

    @property
    def is_model(self) -> bool:
        return isinstance(self.annotation, type) and issubclass(self.annotation, BaseModel)

    @property
    def kind(self) -> str:
        """The JSON type the field takes: object, array, integer, string, boolean."""
        if self.is_model or typing.get_origin(self.annotation) is dict:
            return "object"
        if typing.get_origin(self.annotation) is list:
            return "array"
        if self.annotation is bool:
            return "boolean"
        if self.annotation is int:
            return "integer"
        return "string"  # str and Literal[str, ...]


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def model_fields(model: type[BaseModel], prefix: FieldPath = ()) -> list[Field]:
    """Every field of `model` and its nested models, depth first, with its constraints."""
    out: list[Field] = []
    for name, info in model.model_fields.items():
        annotation, nullable = _strip_none(info.annotation)
        constraints: dict[str, Any] = {}
        for meta in info.metadata:
            if isinstance(meta, annotated_types.Ge):
                constraints["ge"] = meta.ge
            elif isinstance(meta, annotated_types.Le):
                constraints["le"] = meta.le
            elif isinstance(meta, annotated_types.MinLen):
                constraints["min_length"] = meta.min_length
            elif isinstance(meta, annotated_types.MaxLen):
                constraints["max_length"] = meta.max_length
            elif getattr(meta, "pattern", None):
                constraints["pattern"] = meta.pattern
        field = Field((*prefix, info.alias or name), annotation, nullable, info.is_required(), **constraints)
        out.append(field)
        if field.is_model:
            out += model_fields(annotation, field.path)
    return out


SPEC_FIELDS = model_fields(api.LLMDeploymentSpec)
OBJECT_PATHS: list[FieldPath] = [()] + [f.path for f in SPEC_FIELDS if f.is_model]


# ---------------------------------------------------------------------------------- valid values

# Biases that keep a fair share of generated specs inside the cross-field (CEL) rules; every
# value is still drawn within the model's own bounds.
_HINTS: dict[FieldPath, st.SearchStrategy[Any]] = {
    ("parallelism", "tensor"): st.sampled_from([1, 2, 4, 8, 16, 32, 64]) | st.integers(1, 64),
    ("parallelism", "pipeline"): st.sampled_from([1, 1, 2, 4]) | st.integers(1, 16),
    ("engine", "kvCacheDtype"): st.sampled_from(["auto", "bf16", "fp16", "fp8"]),
    # Adapters as a user lists them (a list of free objects would be refused as unknown fields); the
    # names sometimes repeat or say `base`, which the CEL rules refuse.
    ("engine", "lora"): st.lists(
        st.fixed_dictionaries(
            {
                "name": st.sampled_from(["sql", "chat", "base"])
                | st.from_regex(r"[a-z][a-z0-9.-]{0,10}", fullmatch=True),
                "source": st.sampled_from(["hf://acme/sql-lora@v1", "s3://adapters/chat", "pvc://loras/a"]),
            }
        ),
        max_size=2,
    ),
    ("autoscaling", "scaleToZero"): st.sampled_from([False, False, True]),
    ("serving", "env"): st.lists(
        st.fixed_dictionaries(
            {"name": st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True)},
            optional={"value": st.text(max_size=20)},
        ),
        max_size=2,
    ),
    # Lists of allow-listed objects: the engine container only, and volumes of one safe source each
    # (a list of free objects would be refused as unknown fields, which is not what is under test).
    ("serving", "podTemplate", "spec", "containers"): st.lists(
        st.fixed_dictionaries(
            {"name": st.just("engine")},
            optional={
                "env": st.lists(
                    st.fixed_dictionaries({"name": st.just("EXTRA"), "value": st.text(max_size=8)}),
                    max_size=1,
                )
            },
        ),
        max_size=1,
    ),
    ("serving", "podTemplate", "spec", "volumes"): st.lists(
        st.fixed_dictionaries(
            {
                "name": st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
                "emptyDir": st.just({}),
            }
        ),
        max_size=2,
        unique_by=lambda volume: volume["name"],
    ),
}


def _free_dict() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(min_size=1, max_size=10), JSON_VALUES, max_size=3)


def value_strategy(field: Field) -> st.SearchStrategy[Any]:
    """Values the model accepts for `field` (ignoring cross-field rules)."""
    if field.path in _HINTS:
        return _HINTS[field.path]
    annotation = field.annotation
    if field.is_model:
        return model_strategy(annotation, field.path)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return st.sampled_from(typing.get_args(annotation))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = field.ge if field.ge is not None else -(2**31)
        high = field.le if field.le is not None else low + 10**6
        return st.integers(low, high)
    if annotation is str:
        if field.pattern:
            limit = field.max_length or 10**6
            return st.from_regex(field.pattern, fullmatch=True).filter(lambda s: len(s) <= limit)
        return st.text(min_size=field.min_length or 0, max_size=min(field.max_length or 40, 40))
    if origin is dict:
        _, value = typing.get_args(annotation)
        if value is str:
            return st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=10), max_size=3)
        return _free_dict()
    if origin is list:
        return st.lists(_free_dict(), max_size=2)
    raise NotImplementedError(f"no strategy for {field.path}: {annotation}")


def model_strategy(model: type[BaseModel], prefix: FieldPath = ()) -> st.SearchStrategy[dict[str, Any]]:
    """Wire-form objects of `model`: required fields always, the others sometimes."""
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in model_fields(model, prefix):
        if len(field.path) != len(prefix) + 1:
            continue
        (required if field.required else optional)[field.path[-1]] = value_strategy(field)
    return st.fixed_dictionaries(required, optional=optional)


specs: st.SearchStrategy[Spec] = model_strategy(api.LLMDeploymentSpec)


# ---------------------------------------------------------------------------------- mutations


def set_path(spec: Spec, path: FieldPath, value: Any) -> Spec:
    """A copy of `spec` with `value` at `path` (parents created, or replaced when not objects)."""
    out = json.loads(json.dumps(spec))
    node = out
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return out


def _wrong_type_value(field: Field) -> st.SearchStrategy[Any]:
    others = {
        "object": st.one_of(st.text(max_size=8), st.integers(), st.lists(st.integers(), max_size=2)),
        "array": st.one_of(
            st.text(max_size=8),
            st.integers(),
            st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        ),
        "integer": st.one_of(
            st.text(max_size=8),
            st.integers(0, 99).map(str),
            st.booleans(),
            st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
            st.lists(st.integers(), max_size=2),
            st.just({}),
        ),
        "string": st.one_of(
            st.integers(),
            st.booleans(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.lists(st.text(max_size=3), max_size=2),
            st.just({}),
        ),
        "boolean": st.one_of(st.sampled_from(["true", "false", "yes", 1, 0]), st.text(max_size=5)),
    }
    return others[field.kind]


def _out_of_range_value(field: Field) -> st.SearchStrategy[Any]:
    choices: list[st.SearchStrategy[Any]] = [HUGE_INTEGERS]
    if field.ge is not None:
        choices.append(st.integers(field.ge - 1000, field.ge - 1))
    if field.le is not None:
        choices.append(st.integers(field.le + 1, field.le + 10**6))
    return st.one_of(choices)


NUMERIC_FIELDS = [f for f in SPEC_FIELDS if f.kind == "integer"]
STRING_FIELDS = [f for f in SPEC_FIELDS if f.annotation is str and (f.max_length or f.min_length)]
URI_PATHS: list[FieldPath] = [("model", "source"), ("model", "tokenizer"), ("build", "cache")]


MUTATIONS = (
    "wrong-type",
    "out-of-range",
    "bad-uri",
    "tp-not-power-of-two",
    "min-gt-max-replicas",
    "unknown-field",
    "too-long-or-empty",
    "null",
)


_BASE: Spec = {"model": {"source": "hf://org/model@abc"}, "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}}
# Cases each run tries first: the edges the random draws found once (or would rarely hit).
EXPLICIT: dict[str, list[tuple[FieldPath, Spec]]] = {
    "wrong-type": [
        (("replicas",), set_path(_BASE, ("replicas",), 2.0)),
        (("replicas",), set_path(_BASE, ("replicas",), "1")),
        (("engine",), set_path(_BASE, ("engine",), "fast")),
    ],
    "out-of-range": [
        (("gpu", "memoryMib"), set_path(_BASE, ("gpu", "memoryMib"), 2**63)),
        (("gpu", "memoryMib"), set_path(_BASE, ("gpu", "memoryMib"), 2**40)),
        (("replicas",), set_path(_BASE, ("replicas",), 10001)),
    ],
    "unknown-field": [(("engine", "max_batch_size"), set_path(_BASE, ("engine", "max_batch_size"), 8))],
    "null": [(("model",), set_path(_BASE, ("model",), None)), (("gpu",), set_path(_BASE, ("gpu",), None))],
}


@st.composite
def mutated_specs(draw: st.DrawFn, kind: str) -> tuple[FieldPath, Spec]:
    """(path it touched, spec): a generated spec made wrong in one of the ways users do (`kind`)."""
    spec = draw(specs)
    if kind == "wrong-type":
        field = draw(st.sampled_from(SPEC_FIELDS))
        return field.path, set_path(spec, field.path, draw(_wrong_type_value(field)))
    if kind == "out-of-range":
        field = draw(st.sampled_from(NUMERIC_FIELDS))
        return field.path, set_path(spec, field.path, draw(_out_of_range_value(field)))
    if kind == "bad-uri":
        path = draw(st.sampled_from(URI_PATHS))
        return path, set_path(spec, path, draw(BAD_SOURCES | st.text(max_size=30)))
    if kind == "tp-not-power-of-two":
        path = ("parallelism", "tensor")
        spec = set_path(spec, ("gpu",), spec.get("gpu") or {"product": "NVIDIA-H100-80GB-HBM3"})
        return path, set_path(spec, path, draw(NOT_POWERS_OF_TWO))
    if kind == "min-gt-max-replicas":
        low = draw(st.integers(1, 9999))
        spec = set_path(spec, ("autoscaling", "minReplicas"), draw(st.integers(low + 1, 10000)))
        return ("autoscaling", "minReplicas"), set_path(spec, ("autoscaling", "maxReplicas"), low)
    if kind == "unknown-field":
        parent = draw(st.sampled_from(OBJECT_PATHS))
        known = {f.path[-1] for f in SPEC_FIELDS if f.path[:-1] == parent}
        # snake_case spellings of real fields: what a Python user types by habit
        snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower() for k in known} - known
        name = draw(
            st.sampled_from(sorted(snake | {"replica", "foo"}))
            | st.from_regex(r"[a-zA-Z][a-zA-Z0-9]{0,12}", fullmatch=True)
        )
        if name in known:
            name += "X"
        return (*parent, name), set_path(spec, (*parent, name), draw(JSON_SCALARS))
    if kind == "too-long-or-empty":
        field = draw(st.sampled_from(STRING_FIELDS))
        value = "" if field.min_length and draw(st.booleans()) else "a" * ((field.max_length or 64) + 1)
        return field.path, set_path(spec, field.path, value)
    if kind == "null":
        field = draw(st.sampled_from(SPEC_FIELDS))
        return field.path, set_path(spec, field.path, None)
    raise ValueError(f"unknown mutation {kind!r}")


# ---------------------------------------------------------------------------------- the oracle


@dataclass
class Verdict:
    """The API models on one spec: accepted (with the defaulted wire form), or the paths at fault."""

    accepted: bool
    defaulted: Spec | None
    error_paths: list[str]
    errors: list[str]


def dotted(parts: typing.Iterable[str | int]) -> str:
    """A field path the way the API server writes it: spec.serving.env[0].name."""
    out = "spec"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


@lru_cache(maxsize=1)
def _spec_schema() -> dict[str, Any]:
    return object_schema(api.LLMDeploymentSpec)


def _rules(schema: dict[str, Any]) -> list[str]:
    rules = [r["rule"] for r in schema.get("x-kubernetes-validations", [])]
    for child in (schema.get("properties") or {}).values():
        rules += _rules(child)
    return rules + (_rules(schema["items"]) if "items" in schema else [])


_CEL_ENV = celpy.Environment()
# Compiled once at import: the CEL parser raises the recursion limit, which hypothesis dislikes
# happening inside a test.
_CEL_PROGRAMS = {rule: _CEL_ENV.program(_CEL_ENV.compile(rule)) for rule in _rules(_spec_schema())}


def _int64_safe(value: Any) -> Any:
    """CEL integers are int64; wider ones (only in free-form content here) become floats, as the
    API server stores them."""
    if isinstance(value, dict):
        return {k: _int64_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int64_safe(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return float(value)
    return value


def cel_failures(
    value: Any, schema: dict[str, Any], path: tuple[str | int, ...] = ()
) -> list[tuple[str, str]]:
    """(field path, message) for every CEL rule of the schema that `value` (defaulted) breaks."""
    out: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for name, child in (schema.get("properties") or {}).items():
            if name in value:
                out += cel_failures(value[name], child, (*path, name))
        for rule in schema.get("x-kubernetes-validations", []):
            result = _CEL_PROGRAMS[rule["rule"]].evaluate({"self": celpy.json_to_cel(_int64_safe(value))})
            if not bool(result):
                at = rule.get("fieldPath", "").lstrip(".")
                out.append((dotted((*path, *at.split("."))) if at else dotted(path), rule["message"]))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += cel_failures(item, schema["items"], (*path, i))
    return out


def prune_nulls(value: Any, schema: dict[str, Any] | None = None) -> Any:
    """`value` as the API server sees it: nulls of schema'd, non-nullable fields dropped (Kubernetes
    prunes them before defaulting); nulls inside free-form content are kept."""
    schema = _spec_schema() if schema is None else schema
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return {
            k: prune_nulls(v, props.get(k, {}))
            for k, v in value.items()
            if not (v is None and k in props and not props[k].get("nullable"))
        }
    if isinstance(value, list) and "items" in schema:
        return [prune_nulls(item, schema["items"]) for item in value]
    return value


def judge(spec: Any) -> Verdict:
    """The API models' verdict on a spec as a user would send it (JSON, camelCase)."""
    try:
        model = api.LLMDeploymentSpec.model_validate_json(
            json.dumps(spec), strict=True, by_alias=True, by_name=False
        )
    except ValidationError as exc:
        errors = exc.errors()
        return Verdict(False, None, [dotted(e["loc"]) for e in errors], [e["msg"] for e in errors])
    defaulted = model.to_wire()
    broken = cel_failures(defaulted, _spec_schema())
    if broken:
        return Verdict(False, None, [p for p, _ in broken], [m for _, m in broken])
    return Verdict(True, defaulted, [], [])


PATH_IN_MESSAGE = re.compile(r"spec(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*")


def named_paths(message: str) -> set[str]:
    """Field paths an API server error message names (spec.engine.maxBatchSize, ...)."""
    return set(PATH_IN_MESSAGE.findall(message))
