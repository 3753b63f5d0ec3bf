"""The LLMEngine an LLMDeployment needs: its name (from the engine key) and its immutable spec."""

from __future__ import annotations

from dataclasses import dataclass

from kiln import labels
from kiln.api.enginekey import engine_key, engine_name, engine_spec
from kiln.api.v1alpha1 import API_VERSION, LLMDeployment, LLMEngineSpec
from kiln.render.common import Manifest

CREATED_FOR_ANNOTATION = "kiln.dev/created-for"  # the LLMDeployment that first asked for the engine
ENGINE_KEY_LABEL = "kiln.dev/engine-key"


@dataclass(frozen=True)
class EngineIdentity:
    """Which engine a deployment needs: its key and the LLMEngine's name."""

    key: str
    name: str


def engine_identity(deployment: LLMDeployment, runtime_version: str) -> EngineIdentity:
    """The engine key and LLMEngine name for a deployment's spec."""
    key = engine_key(deployment.spec, runtime_version)
    return EngineIdentity(key=key, name=engine_name(deployment.spec, key))


def desired_engine_spec(deployment: LLMDeployment, runtime_version: str) -> LLMEngineSpec:
    """The LLMEngine spec: everything that changes the artifact, plus where and how to build it."""
    spec = engine_spec(deployment.spec, runtime_version)
    if deployment.spec.build.pod_annotations:
        spec = spec.model_copy(update={"pod_annotations": dict(deployment.spec.build.pod_annotations)})
    return spec


def engine(deployment: LLMDeployment, runtime_version: str) -> Manifest:
    """The LLMEngine for `deployment`, named after its engine key.

    Engines carry no ownerReference to deployments: several deployments share one, and an unused
    engine stays (cached) until the operator's retention time has passed.
    """
    identity = engine_identity(deployment, runtime_version)
    metadata = deployment.metadata
    return {
        "apiVersion": API_VERSION,
        "kind": "LLMEngine",
        "metadata": {
            "name": identity.name,
            "namespace": metadata.namespace,
            "labels": {
                labels.MANAGED_BY: labels.MANAGED_BY_VALUE,
                ENGINE_KEY_LABEL: identity.key,
            },
            "annotations": {CREATED_FOR_ANNOTATION: str(metadata.name)},
        },
        "spec": desired_engine_spec(deployment, runtime_version).to_wire(),
    }
