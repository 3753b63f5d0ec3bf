"""Volumes as host folders and the mountPath -> host path rewriting of argv and env."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from kiln.processnode import mounts
from kiln.processnode.envvars import EnvError, PodFacts
from kiln.processnode.mounts import Mount

POD_DIR = Path("/state/pods/ns_p")
STATE = Path("/state")
FACTS = PodFacts(name="p", namespace="ns", labels={"a": "b"})


@pytest.mark.parametrize(
    ("volume", "claims", "expected"),
    [
        ({"name": "h", "hostPath": {"path": "/data/models"}}, {}, "/data/models"),
        (
            {"name": "c", "persistentVolumeClaim": {"claimName": "models"}},
            {"models": "/repo/examples"},
            "/repo/examples",
        ),
        (
            {"name": "c", "persistentVolumeClaim": {"claimName": "cache"}},
            {"cache": None},
            "/state/pvcs/ns/cache",
        ),
        ({"name": "scratch", "emptyDir": {}}, {}, "/state/pods/ns_p/volumes/scratch"),
        ({"name": "cfg", "configMap": {"name": "x"}}, {}, "/state/pods/ns_p/volumes/cfg"),
    ],
)
def test_volume_host_path(volume: dict, claims: dict, expected: str) -> None:
    assert mounts.volume_host_path(volume, POD_DIR, STATE, "ns", claims) == Path(expected)


def test_container_mounts_apply_sub_path_and_add_the_termination_file() -> None:
    container = {
        "volumeMounts": [
            {"name": "models", "mountPath": "/models/"},
            {"name": "cache", "mountPath": "/cache", "subPath": "engines"},
        ],
        "terminationMessagePath": "/tmp/result",
    }
    found = mounts.container_mounts(
        container, {"models": Path("/repo/examples"), "cache": Path("/c")}, Path("/state/t/c")
    )
    assert found == [
        Mount("/models", Path("/repo/examples")),
        Mount("/cache", Path("/c/engines")),
        Mount("/tmp/result", Path("/state/t/c")),
    ]


def test_a_mount_of_an_unknown_volume_is_an_error() -> None:
    with pytest.raises(EnvError):
        mounts.container_mounts({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, {}, Path("/t"))


MOUNTS = [
    Mount("/models", Path("/repo/examples")),
    Mount("/models/big", Path("/disk/big")),
    Mount("/dev/termination-log", Path("/state/term/c")),
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/models/tiny-chat", "/repo/examples/tiny-chat"),
        ("/models", "/repo/examples"),
        ("/models/big/w.bin", "/disk/big/w.bin"),  # the longest mountPath wins
        ("/modelsx/a", "/modelsx/a"),  # a prefix of a name is not a mount
        ("--model=/models/tiny-chat", "--model=/repo/examples/tiny-chat"),
        ("/dev/termination-log", "/state/term/c"),
        ("--result-file", "--result-file"),
        ("relative/models", "relative/models"),
        ("a=b", "a=b"),
    ],
)
def test_rewrite_path(value: str, expected: str) -> None:
    assert mounts.rewrite_path(value, MOUNTS) == expected


def test_rewrite_argv_and_env() -> None:
    argv = ["kiln-engine", "build", "--result-file", "/dev/termination-log", "--model", "/models/x"]
    assert mounts.rewrite_argv(argv, MOUNTS) == [
        "kiln-engine",
        "build",
        "--result-file",
        "/state/term/c",
        "--model",
        "/repo/examples/x",
    ]
    assert mounts.rewrite_env({"M": "/models/x", "N": "plain"}, MOUNTS) == {
        "M": "/repo/examples/x",
        "N": "plain",
    }


def test_config_map_secret_downward_and_projected_files() -> None:
    config_maps = {"cm": {"a.txt": b"A", "b.txt": b"B"}}
    secrets = {"sec": {"token": b"T"}}
    assert mounts.volume_files({"name": "v", "configMap": {"name": "cm"}}, FACTS, config_maps, secrets) == {
        "a.txt": b"A",
        "b.txt": b"B",
    }
    only = {"name": "v", "configMap": {"name": "cm", "items": [{"key": "b.txt", "path": "sub/b"}]}}
    assert mounts.volume_files(only, FACTS, config_maps, secrets) == {"sub/b": b"B"}
    assert mounts.volume_files(
        {"name": "v", "secret": {"secretName": "sec"}}, FACTS, config_maps, secrets
    ) == {"token": b"T"}
    downward = {
        "name": "v",
        "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]},
    }
    assert mounts.volume_files(downward, FACTS, config_maps, secrets) == {"name": b"p"}
    projected = {
        "name": "kube-api-access",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token"}},
                {"configMap": {"name": "cm", "items": [{"key": "a.txt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
            ]
        },
    }
    files = mounts.volume_files(projected, FACTS, config_maps, secrets, {"token": "jwt"})
    assert files == {"token": b"jwt", "ca.crt": b"A", "namespace": b"ns"}
    assert mounts.volume_files({"name": "e", "emptyDir": {}}, FACTS, config_maps, secrets) is None


def test_missing_config_map_volume_is_an_error_unless_optional() -> None:
    volume = {"name": "v", "configMap": {"name": "absent"}}
    with pytest.raises(EnvError):
        mounts.volume_files(volume, FACTS, {}, {})
    optional = {"name": "v", "configMap": {"name": "absent", "optional": True}}
    assert mounts.volume_files(optional, FACTS, {}, {}) == {}


def test_decode_data_base64_for_secrets_only() -> None:
    secret = {"kind": "Secret", "data": {"k": base64.b64encode(b"v").decode()}}
    config_map = {
        "kind": "ConfigMap",
        "data": {"k": "v"},
        "binaryData": {"b": base64.b64encode(b"\x00").decode()},
    }
    assert mounts.decode_data(secret) == {"k": b"v"}
    assert mounts.decode_data(config_map) == {"k": b"v", "b": b"\x00"}


def test_folders_that_hold_mounts_map_into_the_container_rootfs() -> None:
    claims = [
        Mount("/mnt/pvc/cache", Path("/state/pvcs/ns/cache")),
        Mount("/mnt/pvc/models", Path("/repo/examples")),
    ]
    rootfs = Path("/state/pods/ns_p/rootfs/c")
    assert mounts.rewrite_path("/mnt/pvc", claims, rootfs) == "/state/pods/ns_p/rootfs/c/mnt/pvc"
    assert mounts.rewrite_path("/mnt/pvc/", claims, rootfs) == "/state/pods/ns_p/rootfs/c/mnt/pvc"
    assert mounts.rewrite_path("/mnt/pvc/models/x", claims, rootfs) == "/repo/examples/x"
    assert mounts.rewrite_path("/mnt/other", claims, rootfs) == "/mnt/other"
    assert mounts.rewrite_path("/", claims, rootfs) == "/"
    assert mounts.rewrite_path("/mnt/pvc", claims) == "/mnt/pvc"  # no rootfs, no rewrite


def test_rootfs_links_skip_mounts_nested_in_mounts() -> None:
    rootfs = Path("/r")
    links = mounts.rootfs_links(MOUNTS, rootfs)
    assert links == {
        Path("/r/models"): Path("/repo/examples"),
        Path("/r/dev/termination-log"): Path("/state/term/c"),
    }


def test_kiln_pvc_root_points_at_the_rootfs_when_claims_are_mounted_under_it() -> None:
    claims = [Mount("/mnt/pvc/cache", Path("/c"))]
    assert mounts.pvc_root_env({}, claims) == {"KILN_PVC_ROOT": "/mnt/pvc"}
    assert mounts.pvc_root_env({"KILN_PVC_ROOT": "/data"}, claims) == {}
    assert mounts.pvc_root_env({}, [Mount("/models", Path("/m"))]) == {}


def test_file_modes_from_default_mode_and_items() -> None:
    secret = {
        "name": "s",
        "secret": {
            "secretName": "k",
            "defaultMode": 0o400,
            "items": [{"key": "a", "path": "a", "mode": 0o600}],
        },
    }
    assert mounts.file_modes(secret) == (0o400, {"a": 0o600})
    projected = {
        "name": "p",
        "projected": {
            "defaultMode": 0o440,
            "sources": [{"configMap": {"name": "c", "items": [{"key": "k", "path": "x", "mode": 0o755}]}}],
        },
    }
    assert mounts.file_modes(projected) == (0o440, {"x": 0o755})
    assert mounts.file_modes({"name": "e", "emptyDir": {}}) == (0o644, {})
