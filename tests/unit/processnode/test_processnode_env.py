"""Container env and argv as the kubelet builds them: envFrom, valueFrom, `$(VAR)`, entrypoints."""

from __future__ import annotations

import pytest

from kiln.processnode import envvars
from kiln.processnode.envvars import PodFacts

FACTS = PodFacts(
    name="web-0",
    namespace="demo",
    uid="u-1",
    labels={"app": "web"},
    annotations={"note": "hi"},
    node_name="kiln-process-node",
    pod_ip="10.244.255.10",
    host_ip="127.0.0.1",
)


def lookup(values: dict[str, str]):
    return values.get


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "1"),
        ("x$(A)y$(B)z", "x1y2z"),
        ("$$(A)", "$(A)"),  # escaped: the kubelet leaves the reference literal
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("cost $5", "cost $5"),
        ("$", "$"),
        ("$$$(A)", "$1"),
    ],
)
def test_expand_follows_the_kubelet(text: str, expected: str) -> None:
    assert envvars.expand(text, lookup({"A": "1", "B": "2"})) == expected


def test_env_resolves_field_refs_config_maps_and_secrets_in_order() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "base"}, "prefix": "CM_"}, {"secretRef": {"name": "creds"}}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "URL", "value": "http://$(POD_IP):8000/$(LATER)"},
            {"name": "LATER", "value": "late"},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "base", "key": "mode"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "none", "key": "k", "optional": True}}},
        ],
    }
    env = envvars.container_env(
        container, FACTS, {"base": {"mode": "fast", "bad key": "x"}}, {"creds": {"token": "s3cret"}}
    )
    assert env["POD_IP"] == "10.244.255.10"
    assert env["POD_NAME"] == "web-0" and env["NS"] == "demo" and env["APP"] == "web"
    # A reference resolves only against variables defined before it, as in the kubelet.
    assert env["URL"] == "http://10.244.255.10:8000/$(LATER)"
    assert env["CM_mode"] == "fast" and "CM_bad key" not in env
    assert env["MODE"] == "fast" and env["TOKEN"] == "s3cret" and env["token"] == "s3cret"
    assert "GONE" not in env


def test_later_env_overrides_env_from() -> None:
    container = {"envFrom": [{"configMapRef": {"name": "cm"}}], "env": [{"name": "A", "value": "mine"}]}
    assert envvars.container_env(container, FACTS, {"cm": {"A": "theirs"}}, {})["A"] == "mine"


@pytest.mark.parametrize(
    "var",
    [
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}},
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "absent"}}},
    ],
)
def test_a_missing_required_reference_is_a_config_error(var: dict) -> None:
    with pytest.raises(envvars.EnvError) as error:
        envvars.container_env({"env": [var]}, FACTS, {}, {"creds": {"token": "t"}})
    assert error.value.reason == envvars.CONFIG_ERROR


def test_resource_field_ref_uses_limits_then_node_allocatable() -> None:
    container = {
        "resources": {"limits": {"memory": "2Gi"}, "requests": {"cpu": "500m"}},
        "env": [
            {
                "name": "MEM",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        ],
    }
    env = envvars.container_env(container, FACTS, {}, {}, {"cpu": "16", "memory": "64Gi"})
    assert env == {"MEM": "2048", "REQ": "1", "CPU": "16"}


def test_argv_expands_command_and_args_against_the_env() -> None:
    container = {
        "command": ["kiln-engine", "serve"],
        "args": ["--host", "$(POD_IP)", "--port", "8000", "--x=$$(POD_IP)", "$(UNSET)"],
    }
    argv = envvars.container_argv(container, {"POD_IP": "10.244.255.10"})
    assert argv == [
        "kiln-engine",
        "serve",
        "--host",
        "10.244.255.10",
        "--port",
        "8000",
        "--x=$(POD_IP)",
        "$(UNSET)",
    ]


@pytest.mark.parametrize(
    ("image", "entrypoint"),
    [
        ("ghcr.io/kiln-dev/kiln-engine:0.1.0-torch", ["kiln-engine"]),
        ("ghcr.io/kiln-dev/kiln:0.1.0", ["kiln"]),
        ("localhost:5000/kiln@sha256:abc", ["kiln"]),
    ],
)
def test_entrypoint_comes_from_the_image_name(image: str, entrypoint: list[str]) -> None:
    assert envvars.container_argv({"image": image, "args": ["serve"]}, {}) == [*entrypoint, "serve"]


def test_an_unknown_image_without_command_fails_with_unknown_image() -> None:
    with pytest.raises(envvars.UnknownImageError) as error:
        envvars.container_argv({"image": "busybox:1.36"}, {})
    assert error.value.reason == "UnknownImage"


def test_referenced_objects_covers_env_env_from_and_volumes() -> None:
    pod = {
        "spec": {
            "initContainers": [{"envFrom": [{"secretRef": {"name": "s1"}}]}],
            "containers": [
                {"env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c1", "key": "k"}}}]}
            ],
            "volumes": [
                {"name": "v", "configMap": {"name": "c2"}},
                {"name": "w", "secret": {"secretName": "s2"}},
                {"name": "p", "projected": {"sources": [{"configMap": {"name": "c3"}}]}},
            ],
        }
    }
    assert envvars.referenced_objects(pod) == ({"c1", "c2", "c3"}, {"s1", "s2"})
