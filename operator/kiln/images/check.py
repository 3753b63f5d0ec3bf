"""Checks built images the way the cluster will use them: each entrypoint answers `--help` in a
container run like the pods run it, each image's user is the non-root uid the operator's and the
chart's pods ask for, and the engine image can compile a C extension against Python.h (what Triton
does on first launch)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from kiln.images import plan
from kiln.images.build import ImageError, Say, capture, repo_images
from kiln.render.common import RUN_AS_USER

# Run inside the engine image: build and import a tiny C extension with `cc` and Python.h, the
# way Triton builds its launchers; report what was found.
TOOLCHAIN_PROBE = r"""
import json, os, subprocess, sys, sysconfig, tempfile, importlib.util
include = sysconfig.get_paths()["include"]
work = tempfile.mkdtemp()
source = os.path.join(work, "probe.c")
with open(source, "w") as f:
    f.write('#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "probe"};\n'
            'PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\n')
suffix = sysconfig.get_config_var("EXT_SUFFIX")
target = os.path.join(work, "probe" + suffix)
subprocess.run(["cc", "-shared", "-fPIC", "-O0", "-I", include, source, "-o", target], check=True)
spec = importlib.util.spec_from_file_location("probe", target)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
cc = subprocess.run(["cc", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
import torch, triton
print(json.dumps({"uid": os.getuid(), "python_h": os.path.join(include, "Python.h"), "cc": cc,
                  "compiled": os.path.basename(target), "torch": torch.__version__,
                  "triton": triton.__version__}))
"""


def find_helm() -> Path:
    """The helm that `kiln local build` builds (or $KILN_HELM)."""
    from kiln.local import build

    helm = Path(os.environ.get("KILN_HELM") or build.bin_dir() / "helm")
    if not os.access(helm, os.X_OK):
        raise ImageError(f"helm is not built at {helm}: run `kiln local build` (it reads the chart's pods)")
    return helm


def chart_pod_users(root: Path) -> list[plan.PodUser]:
    """The chart's workloads as `helm template` renders them with default values, for the
    Kubernetes version the local cluster runs (the chart declares a kubeVersion range)."""
    from kiln.local import build

    kubernetes = build.module_versions((build.GOTOOLS_DIR / "go.mod").read_text())["k8s.io/kubernetes"]
    chart = str(root / "charts" / "kiln")
    manifests = capture([str(find_helm()), "template", "kiln", chart, f"--kube-version={kubernetes}"])
    return plan.pod_users(yaml.safe_load_all(manifests))


def run_in(image: plan.Image, storage: Path | None, args: list[str], entrypoint: str | None = None) -> str:
    done = subprocess.run(
        plan.run_command(image.tag, storage, args, entrypoint),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise ImageError(
            f"{image.tag} {' '.join(args)[:60]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


@dataclass(frozen=True)
class Checked:
    image: plan.Image
    uid: int
    size: int
    notes: str


def check_image(image: plan.Image, storage: Path | None, chart: list[plan.PodUser], say: Say) -> Checked:
    flags = plan.storage_flags(storage)
    user = capture(
        ["buildah", *flags, "inspect", "--type=image", "--format={{.OCIv1.Config.User}}", image.tag]
    )
    uid = plan.image_uid(user.strip())
    problems = plan.user_problems(image, uid, RUN_AS_USER, chart)
    if problems:
        raise ImageError("; ".join(problems))
    usage = run_in(image, storage, ["--help"])
    if "Usage:" not in usage:
        raise ImageError(f"{image.tag} --help printed no usage:\n{usage}")
    say(f"{image.name}: --help ok, uid {uid}")
    notes = "--help ok"
    if image.name == plan.ENGINE:
        probe = json.loads(run_in(image, storage, ["-c", TOOLCHAIN_PROBE], entrypoint="/opt/kiln/bin/python"))
        if probe["uid"] != uid:
            raise ImageError(f"{image.tag} ran as uid {probe['uid']}, its USER is {uid}")
        say(f"{image.name}: compiled {probe['compiled']} with {probe['cc']} and {probe['python_h']}")
        notes += f"; cc + Python.h compile ok; torch {probe['torch']}, triton {probe['triton']}"
    size = int(capture(["podman", *flags, "image", "inspect", "--format={{.Size}}", image.tag]).strip())
    return Checked(image, uid, size, notes)


def check_all(
    root: Path, names: tuple[str, ...], cache: Path, storage: Path | None, say: Say
) -> list[Checked]:
    """Check the selected images; raise ImageError naming the first that fails."""
    selected = plan.select(repo_images(root), names)
    chart = chart_pod_users(root)
    if not chart:
        raise ImageError("helm template rendered no workloads: nothing to check the images' users against")
    problems = plan.chart_image_problems(chart, repo_images(root))
    if problems:
        raise ImageError("; ".join(problems))
    checked = [check_image(image, storage, chart, say) for image in selected]
    rows = [["image", "uid", "size", "archive", "checks"]]
    for item in checked:
        archive = cache / item.image.archive_name
        archive_size = plan.human_size(archive.stat().st_size) if archive.is_file() else "-"
        rows.append([item.image.tag, str(item.uid), plan.human_size(item.size), archive_size, item.notes])
    say(plan.table(rows))
    return checked
