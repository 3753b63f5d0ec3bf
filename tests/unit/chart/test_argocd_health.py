"""The Argo CD health checks (Lua) for LLMDeployment and LLMEngine, run against status fixtures.

Argo CD runs these scripts in gopher-lua (Lua 5.1) with the live object as the global `obj`; here
they run in Lua 5.1 through lupa with the same global and without the `os`/`io` libraries, against
the fixtures and expectations in Argo CD's own test format (`health_test.yaml`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from kiln.api import v1alpha1

ROOT = Path(__file__).resolve().parents[3]
CHECKS = ROOT / "charts" / "kiln" / "argocd" / "kiln.dev"
KINDS = ("LLMDeployment", "LLMEngine")
ARGO_HEALTH_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def to_lua(runtime: Any, value: Any) -> Any:
    """Python data as Argo CD hands JSON to Lua: objects and arrays become (1-based) tables."""
    if isinstance(value, dict):
        return runtime.table_from({key: to_lua(runtime, item) for key, item in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, item) for item in value])
    return value


def run_health_check(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    """Runs the kind's health.lua on `obj` and returns the {status, message} table it builds."""
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    lua_globals = runtime.globals()
    for unavailable in ("os", "io", "debug", "package", "require", "dofile", "loadfile"):
        lua_globals[unavailable] = None
    lua_globals.obj = to_lua(runtime, obj)
    result = runtime.execute((CHECKS / kind / "health.lua").read_text())
    return {key: result[key] for key in ("status", "message") if result[key] is not None}


def load_cases(kind: str) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    spec = yaml.safe_load((CHECKS / kind / "health_test.yaml").read_text())
    cases = []
    for test in spec["tests"]:
        obj = yaml.safe_load((CHECKS / kind / test["inputPath"]).read_text())
        cases.append((test["inputPath"], obj, test["healthStatus"]))
    return cases


CASES = [(kind, *case) for kind in KINDS for case in load_cases(kind)]
CASE_IDS = [f"{kind}:{input_path}" for kind, input_path, _, _ in CASES]
PHASES = {"LLMDeployment": v1alpha1.DeploymentPhase.__args__, "LLMEngine": v1alpha1.EnginePhase.__args__}


@pytest.mark.parametrize(("kind", "input_path", "obj", "expected"), CASES, ids=CASE_IDS)
def test_health_matches_argo_test_expectation(
    kind: str, input_path: str, obj: dict[str, Any], expected: dict[str, str]
) -> None:
    assert expected["status"] in ARGO_HEALTH_STATUSES
    assert run_health_check(kind, obj) == expected


@pytest.mark.parametrize(("kind", "input_path", "obj", "expected"), CASES, ids=CASE_IDS)
def test_fixture_is_a_valid_object(
    kind: str, input_path: str, obj: dict[str, Any], expected: dict[str, str]
) -> None:
    """Fixtures are objects the API models accept, so the checks are tested on real shapes."""
    model = v1alpha1.LLMDeployment if kind == "LLMDeployment" else v1alpha1.LLMEngine
    if "unknown_phase" in input_path:
        with pytest.raises(ValueError, match="phase"):
            model.model_validate(obj)
        return
    model.model_validate(obj)


@pytest.mark.parametrize("kind", KINDS)
def test_every_phase_is_covered(kind: str) -> None:
    """Each phase the API defines has at least one fixture, so a new phase needs a decision here."""
    phases = set(PHASES[kind])
    covered = {(obj.get("status") or {}).get("phase") for _, obj, _ in load_cases(kind)}
    assert phases <= covered, f"phases without a health fixture: {sorted(phases - covered)}"


def test_observed_generation_lag_wins_over_any_phase() -> None:
    """Whatever the status says, it describes an older spec until observedGeneration catches up."""
    for phase in PHASES["LLMDeployment"]:
        obj = {"metadata": {"generation": 7}, "status": {"phase": phase, "observedGeneration": 6}}
        assert run_health_check("LLMDeployment", obj)["status"] == "Progressing", phase


def test_checks_do_not_use_libraries_argo_cd_lacks() -> None:
    """The sandbox above is real: a script that touches `os` fails there, as it would in Argo CD."""
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    runtime.globals()["os"] = None
    with pytest.raises(lua51.LuaError):
        runtime.execute("return os.time()")
