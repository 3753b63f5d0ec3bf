"""Generated LLMDeployment specs against the real API server: each is accepted (and then valid per the
API models) or rejected at admission naming the field; whatever the models accept, the server accepts
with the same defaults.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from kubernetes import client
from kubernetes.client.rest import ApiException

from kiln.api.v1alpha1 import GROUP, VERSION, LLMDeploymentSpec
from kiln.local.testing import LocalCluster
from tests.reliability import spec_strategies as ss
from tests.reliability.report import Report

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PLURAL = "llmdeployments"
VALID_EXAMPLES = 100
EXAMPLES_PER_MUTATION = 15
# No shrinking: each example is a round trip to the API server, and the failing spec itself is
# what the report shows.
SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
_names = itertools.count()


@dataclass
class Outcome:
    """What the API server did with one spec."""

    status: int  # 201 created, else the error's HTTP status
    stored_spec: dict[str, Any] | None = None
    message: str = ""


@dataclass
class Tally:
    """What one scenario tried and what broke the contract."""

    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    server_only: int = 0  # the models reject, the server accepts: allowed if what it stored is valid
    nulls_pruned: int = 0
    violations: list[str] = field(default_factory=list)
    server_only_kinds: Counter[str] = field(default_factory=Counter)

    def detail(self) -> str:
        text = f"{self.accepted} accepted, {self.rejected} rejected naming the field"
        if self.nulls_pruned:
            text += f"; {self.nulls_pruned} with nulls the server pruned before validating"
        if self.server_only:
            kinds = ", ".join(f"{k} x{n}" for k, n in self.server_only_kinds.most_common())
            text += f"; {self.server_only} accepted by the server only ({kinds}), stored form valid"
        if self.violations:
            text += f"; VIOLATIONS: {self.violations[0]}"
        return text


def submit(custom: client.CustomObjectsApi, namespace: str, spec: Any) -> Outcome:
    """Create the LLMDeployment as kubectl does (strict field validation), then delete it."""
    name = f"p{next(_names)}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }
    try:
        created = cast(
            dict[str, Any],
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
            ),
        )
    except ApiException as exc:
        try:
            message = str(json.loads(exc.body or "")["message"])
        except (TypeError, ValueError, KeyError):
            message = str(exc.body)
        return Outcome(exc.status, message=message)
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return Outcome(201, stored_spec=created["spec"])


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON documents. Numbers compare by value: the API server stores an integral float in
    free-form (preserve-unknown-fields) content as an integer, rounded to its shortest decimal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    numbers = (int, float)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-15, abs_tol=0)
    return type(a) is type(b) and a == b


def check(spec: Any, touched: tuple[str, ...] | None, outcome: Outcome, tally: Tally) -> None:
    """Record in `tally` whether the server kept the contract for `spec`."""
    seen = ss.prune_nulls(spec)  # what the server validates: Kubernetes drops nulls first
    verdict = ss.judge(seen)
    if seen != spec:
        tally.nulls_pruned += 1
    tally.cases += 1
    problem = ""
    if outcome.status == 201:
        tally.accepted += 1
        stored = outcome.stored_spec
        try:
            LLMDeploymentSpec.model_validate(stored)  # how the operator parses it
        except ValueError as exc:
            problem = f"accepted but the operator cannot parse what was stored: {exc}"
        else:
            again = ss.judge(stored)
            if not again.accepted:
                problem = f"accepted but stored form breaks the API rules: {again.errors}"
            elif verdict.accepted and not same_json(stored, verdict.defaulted):
                problem = f"server defaults differ from the models': {stored} != {verdict.defaulted}"
            elif not verdict.accepted:
                tally.server_only += 1
                tally.server_only_kinds[verdict.errors[0][:60]] += 1
    elif outcome.status in (400, 422):
        tally.rejected += 1
        named = ss.named_paths(outcome.message)
        expected = set(verdict.error_paths) | ({ss.dotted(touched)} if touched else set())
        if verdict.accepted:
            problem = f"the models accept it but the server rejected it: {outcome.message}"
        elif not named & expected:
            problem = (
                f"rejection names {sorted(named)}, expected one of {sorted(expected)}: {outcome.message}"
            )
    else:
        problem = f"HTTP {outcome.status}: {outcome.message}"
    if problem:
        tally.violations.append(f"{problem} -- spec {json.dumps(spec)[:600]}")


@pytest.fixture
def custom(local_cluster: LocalCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(local_cluster.api_client)


def test_generated_specs_accepted_iff_the_models_accept(
    custom: client.CustomObjectsApi, namespace: str, reliability_report: Report
) -> None:
    tally = Tally()

    @settings(SETTINGS, max_examples=VALID_EXAMPLES)
    @given(spec=ss.specs)
    def run(spec: dict[str, Any]) -> None:
        before = len(tally.violations)
        check(spec, None, submit(custom, namespace, spec), tally)
        assert len(tally.violations) == before, tally.violations[-1]

    try:
        run()
    finally:
        reliability_report.record(
            "CRD: specs generated from the API models", tally.cases, len(tally.violations), tally.detail()
        )
    # Without valid specs the converse (models accept => server accepts) would go untested.
    assert tally.accepted >= VALID_EXAMPLES // 2, tally.detail()


@pytest.mark.parametrize("kind", ss.MUTATIONS)
def test_mutated_specs_rejected_naming_the_field(
    custom: client.CustomObjectsApi, namespace: str, reliability_report: Report, kind: str
) -> None:
    tally = Tally()

    @settings(SETTINGS, max_examples=EXAMPLES_PER_MUTATION)
    @given(case=ss.mutated_specs(kind))
    def run(case: tuple[tuple[str, ...], dict[str, Any]]) -> None:
        touched, spec = case
        before = len(tally.violations)
        check(spec, touched, submit(custom, namespace, spec), tally)
        assert len(tally.violations) == before, tally.violations[-1]

    for case in ss.EXPLICIT.get(kind, []):
        run = example(case=case)(run)
    try:
        run()
    finally:
        reliability_report.record(f"CRD: mutation {kind}", tally.cases, len(tally.violations), tally.detail())
    if kind != "null":  # a null is pruned by the server, then defaulted: usually accepted
        assert tally.rejected > 0, tally.detail()
