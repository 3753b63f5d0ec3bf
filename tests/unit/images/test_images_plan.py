"""The image builds' pure decisions: tags from the chart and operator, the base's cache key, the
buildah/podman command lines, and the user checks' verdicts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kiln.images import plan
from kiln.images.build import repo_images
from kiln.render.common import RUN_AS_USER, Settings

ROOT = Path(__file__).resolve().parents[3]


def test_tags_are_the_chart_default_and_the_operator_default() -> None:
    chart = yaml.safe_load((ROOT / "charts/kiln/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts/kiln/values.yaml").read_text())
    tags = {image.name: image.tag for image in repo_images(ROOT)}
    assert tags[plan.CONTROL_PLANE] == f"{values['image']['repository']}:{chart['appVersion']}"
    assert tags[plan.ENGINE] == Settings().image_for("torch")


def test_images_refuse_a_chart_without_app_version() -> None:
    with pytest.raises(ValueError, match="appVersion"):
        plan.images({}, {"image": {"repository": "r"}}, "e:1")


def test_every_dockerfile_runs_as_the_pods_user() -> None:
    dockerfiles = {ROOT / image.dockerfile for image in repo_images(ROOT)}
    dockerfiles |= set((ROOT / "engine-image").glob("Dockerfile.*"))  # tensorrt-llm too, built elsewhere
    for dockerfile in dockerfiles:
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
        assert [plan.image_uid(user) for user in users] == [RUN_AS_USER], dockerfile


def test_select_keeps_order_and_names_the_known_images_on_a_typo() -> None:
    both = plan.images({"appVersion": "1"}, {"image": {"repository": "r"}}, "e:1-torch")
    assert plan.select(both, []) == both
    assert plan.select(both, ["kiln-engine"]) == [both[1]]
    with pytest.raises(ValueError, match="kiln, kiln-engine"):
        plan.select(both, ["kiln-engin"])


def test_base_key_follows_mmdebstrap_inputs() -> None:
    base = plan.Base()
    assert plan.Base().key == base.key
    assert plan.Base(suite="trixie").key != base.key
    assert plan.Base(mirrors=base.mirrors[:1]).key != base.key
    assert base.key in base.tag and base.key in base.tarball_name
    command = base.mmdebstrap_command(Path("/x/base.tar"))
    assert command[-len(base.mirrors) :] == list(base.mirrors) and "/x/base.tar" in command


def test_archive_names_are_file_names_and_distinct() -> None:
    names = [image.archive_name for image in repo_images(ROOT)]
    assert len(set(names)) == len(names)
    assert all("/" not in name and ":" not in name for name in names)


def test_build_command_mounts_the_ca_bundle_only_when_given() -> None:
    image = plan.Image("kiln", "Dockerfile", "r:1")
    plain = plan.build_command(image, "base:1", Path("/repo"), None, None)
    assert "--build-arg=BASE_IMAGE=base:1" in plain and "--tag=r:1" in plain and plain[-1] == "/repo"
    assert not any(arg.startswith("--volume") or "PIP_CERT" in arg for arg in plain)
    with_ca = plan.build_command(image, "base:1", Path("/repo"), Path("/s"), Path("/ca.pem"))
    assert f"--volume=/ca.pem:{plan.BUILD_CA_PATH}:ro" in with_ca
    assert f"--build-arg=PIP_CERT={plan.BUILD_CA_PATH}" in with_ca
    assert with_ca[1:5] == ["--root", "/s/root", "--runroot", "/s/run"]


def test_run_command_isolates_like_a_pod() -> None:
    command = plan.run_command("r:1", None, ["--help"], entrypoint="/bin/python")
    assert {"--network=none", "--read-only", "--tmpfs=/tmp", "--entrypoint=/bin/python"} <= set(command)
    assert command[-2:] == ["r:1", "--help"]


@pytest.mark.parametrize(("user", "uid"), [("65532:65532", 65532), ("10001", 10001), ("0", 0)])
def test_image_uid(user: str, uid: int) -> None:
    assert plan.image_uid(user) == uid


@pytest.mark.parametrize("user", ["", "nonroot", "nonroot:nonroot"])
def test_image_uid_refuses_what_the_kubelet_cannot_verify(user: str) -> None:
    with pytest.raises(ValueError, match="numeric"):
        plan.image_uid(user)


def _deployment(name: str, image: str, pod_uid: int | None, container_uid: int | None = None) -> dict:
    container: dict = {"name": "c", "image": image}
    if container_uid is not None:
        container["securityContext"] = {"runAsUser": container_uid}
    pod: dict = {"containers": [container]}
    if pod_uid is not None:
        pod["securityContext"] = {"runAsUser": pod_uid}
    return {"kind": "Deployment", "metadata": {"name": name}, "spec": {"template": {"spec": pod}}}


def test_pod_users_reads_pod_and_container_security_contexts() -> None:
    cron = {
        "kind": "CronJob",
        "metadata": {"name": "ignored"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": []}}}}},
    }
    users = plan.pod_users(
        [_deployment("a", "i:1", 5), _deployment("b", "i:1", 5, 7), None, {"kind": "Service"}, cron]
    )
    assert users == [plan.PodUser("Deployment/a/c", "i:1", 5), plan.PodUser("Deployment/b/c", "i:1", 7)]


def test_user_problems_name_each_disagreement() -> None:
    image = plan.Image("kiln", "Dockerfile", "i:1")
    agree = plan.pod_users([_deployment("a", "i:1", 65532), _deployment("x", "other:1", 1)])
    assert plan.user_problems(image, 65532, 65532, agree) == []
    problems = plan.user_problems(image, 10001, 65532, plan.pod_users([_deployment("a", "i:1", 65532)]))
    assert len(problems) == 2 and "runAsUser 65532" in problems[0] and "Deployment/a/c" in problems[1]
    assert any("root" in problem for problem in plan.user_problems(image, 0, 0, []))


def test_chart_image_problems_flag_unbuilt_images() -> None:
    built = [plan.Image("kiln", "Dockerfile", "i:1")]
    chart = plan.pod_users([_deployment("a", "i:1", 1), _deployment("b", "i:2", 1)])
    assert plan.chart_image_problems(chart, built) == ["chart Deployment/b/c uses i:2, which is not built"]


def test_table_aligns_columns() -> None:
    lines = plan.table([["image", "size"], ["ghcr.io/x:1", "1.00 GiB"]]).splitlines()
    assert lines[0].index("size") == lines[1].index("1.00")


@pytest.mark.parametrize(("size", "text"), [(512, "512 B"), (1536, "1.50 KiB"), (3 * 2**30, "3.00 GiB")])
def test_human_size(size: int, text: str) -> None:
    assert plan.human_size(size) == text


def test_archive_is_a_docker_archive_named_by_the_tag() -> None:
    image = plan.Image("kiln", "Dockerfile", "ghcr.io/x/kiln:1")
    command = plan.archive_command(image, Path("/cache/a.tar"), None)
    assert command[-2:] == ["ghcr.io/x/kiln:1", "docker-archive:/cache/a.tar:ghcr.io/x/kiln:1"]
