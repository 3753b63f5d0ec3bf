"""KWOK's configuration: which nodes it simulates and the Stages that move nodes and pods along.

Nodes: KWOK manages only nodes labelled `type=kwok` (see kiln.local.topology), marks them Ready
and keeps their leases fresh. Pods on those nodes:

* every pod becomes Running and Ready about a second after it is bound;
* a pod owned by a Job then Succeeds (exit code 0) after `kiln.dev/simulate-duration`
  (a Go duration such as "5s"; default 1s);
* a pod annotated `kiln.dev/simulate-fail: "true"` fails with exit code 1 after the same delay:
  phase Failed when its restartPolicy is Never, else CrashLoopBackOff (Running, not Ready);
* a Running pod marked not Ready while its node's lease lapsed is made Ready again, as a
  kubelet would once the node is back;
* a deleted pod disappears at once (there is no kubelet to wait for).
"""

from __future__ import annotations

from typing import Any

import yaml

from kiln.local.topology import KWOK_NODE_LABEL, KWOK_NODE_LABEL_VALUE

SIMULATE_FAIL_ANNOTATION = "kiln.dev/simulate-fail"
SIMULATE_DURATION_ANNOTATION = "kiln.dev/simulate-duration"
KWOK_NODE_SELECTOR = f"{KWOK_NODE_LABEL}={KWOK_NODE_LABEL_VALUE}"

_NOT_DELETED = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
_RUNNING = {"key": ".status.phase", "operator": "In", "values": ["Running"]}
_FAIL_REQUESTED = {
    "key": f'.metadata.annotations["{SIMULATE_FAIL_ANNOTATION}"]',
    "operator": "In",
    "values": ["true"],
}
_FAIL_NOT_REQUESTED = {**_FAIL_REQUESTED, "operator": "NotIn"}
_RUN_DELAY = {
    "durationMilliseconds": 1000,
    "durationFrom": {"expressionFrom": f'.metadata.annotations["{SIMULATE_DURATION_ANNOTATION}"]'},
}

_NODE_CONDITIONS = """
{{ $now := Now }}
{{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
conditions:
{{ range NodeConditions }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $lastTransitionTime | Quote }}
  message: {{ .message | Quote }}
  reason: {{ .reason | Quote }}
  status: {{ .status | Quote }}
  type: {{ .type | Quote }}
{{ end }}
"""

_NODE_INITIALIZE = (
    _NODE_CONDITIONS
    + """
addresses:
{{ with NodeIP }}
- address: {{ . | Quote }}
  type: InternalIP
{{ end }}
{{ with NodeName }}
- address: {{ . | Quote }}
  type: Hostname
{{ end }}
{{ with NodePort }}
daemonEndpoints:
  kubeletEndpoint:
    Port: {{ . }}
{{ end }}
{{ $nodeInfo := .status.nodeInfo }}
{{ $version := printf "kwok-%s" Version }}
nodeInfo:
  architecture: {{ or $nodeInfo.architecture "amd64" }}
  containerRuntimeVersion: {{ or $nodeInfo.containerRuntimeVersion $version }}
  kernelVersion: {{ or $nodeInfo.kernelVersion $version }}
  kubeProxyVersion: {{ or $nodeInfo.kubeProxyVersion $version }}
  kubeletVersion: {{ or $nodeInfo.kubeletVersion $version }}
  operatingSystem: {{ or $nodeInfo.operatingSystem "linux" }}
  osImage: {{ or $nodeInfo.osImage "KWOK simulated node" }}
phase: Running
"""
)

_POD_IP_ARGS = (
    '( or .spec.hostNetwork false ) ( or .metadata.uid "" ) '
    '( or .metadata.name "" ) ( or .metadata.namespace "" )'
)

# The conditions of a Ready pod; also, alone, what makes a pod Ready again.
_POD_READY_CONDITIONS = """
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: PodScheduled
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
{{ range .spec.readinessGates }}
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: {{ .conditionType | Quote }}
{{ end }}
"""

_POD_READY = (
    _POD_READY_CONDITIONS
    + """containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  started: true
  restartCount: 0
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
initContainerStatuses:
{{ range .spec.initContainers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
{{ end }}
{{ with NodeIPWith .spec.nodeName }}
hostIP: {{ . | Quote }}
hostIPs:
- ip: {{ . | Quote }}
{{ end }}
{{ with PodIPWith .spec.nodeName POD_IP_ARGS }}
podIP: {{ . | Quote }}
podIPs:
- ip: {{ . | Quote }}
{{ end }}
phase: Running
startTime: {{ $now | Quote }}
""".replace("POD_IP_ARGS", _POD_IP_ARGS)
)


# Only the conditions: the pod keeps its IP and container statuses (a second IP is invalid).
_POD_READY_AGAIN = _POD_READY_CONDITIONS


def _pod_terminated(exit_code: int, reason: str, phase: str) -> str:
    """Status of a pod whose containers all exited with `exit_code`."""
    return f"""
{{{{ $now := Now }}}}
conditions:
- lastTransitionTime: {{{{ $now | Quote }}}}
  status: "True"
  type: PodScheduled
- lastTransitionTime: {{{{ $now | Quote }}}}
  status: "True"
  type: Initialized
- lastTransitionTime: {{{{ $now | Quote }}}}
  reason: Pod{phase}
  status: "False"
  type: Ready
- lastTransitionTime: {{{{ $now | Quote }}}}
  reason: Pod{phase}
  status: "False"
  type: ContainersReady
containerStatuses:
{{{{ range .spec.containers }}}}
- image: {{{{ .image | Quote }}}}
  name: {{{{ .name | Quote }}}}
  ready: false
  started: false
  restartCount: 0
  state:
    terminated:
      exitCode: {exit_code}
      reason: {reason}
      startedAt: {{{{ $now | Quote }}}}
      finishedAt: {{{{ $now | Quote }}}}
{{{{ end }}}}
phase: {phase}
"""


_POD_CRASH_LOOP = """
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: PodScheduled
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  reason: ContainersNotReady
  status: "False"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  reason: ContainersNotReady
  status: "False"
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  started: false
  restartCount: 1
  lastState:
    terminated:
      exitCode: 1
      reason: Error
      startedAt: {{ $now | Quote }}
      finishedAt: {{ $now | Quote }}
  state:
    waiting:
      reason: CrashLoopBackOff
      message: back-off 10s restarting failed container
{{ end }}
phase: Running
"""


def _stage(
    name: str, kind: str, match: list[dict[str, Any]], next_: dict[str, Any], **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": name},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": kind},
            "selector": {"matchExpressions": match},
            **spec,
            "next": next_,
        },
    }


def stages() -> list[dict[str, Any]]:
    """The Stage objects for nodes and pods (see the module docstring for what each does)."""
    node_ready = {
        "key": '.status.conditions.[] | select( .type == "Ready" ) | .status',
        "operator": "In",
        "values": ["True"],
    }
    pod_ready = {**node_ready, "operator": "In"}
    containers_ready = {
        "key": '.status.conditions.[] | select( .type == "ContainersReady" ) | .status',
        "operator": "In",
        "values": ["True"],
    }
    return [
        _stage(
            "node-initialize",
            "Node",
            [{**node_ready, "operator": "NotIn"}],
            {"statusTemplate": _NODE_INITIALIZE},
        ),
        _stage(
            "node-heartbeat-with-lease",
            "Node",
            [{"key": ".status.phase", "operator": "In", "values": ["Running"]}, node_ready],
            {"statusTemplate": _NODE_CONDITIONS},
            delay={"durationMilliseconds": 600000, "jitterDurationMilliseconds": 610000},
        ),
        _stage(
            "pod-ready",
            "Pod",
            [
                _NOT_DELETED,
                {"key": ".status.phase", "operator": "In", "values": ["Pending"]},
                {**pod_ready, "operator": "NotIn"},
            ],
            {"statusTemplate": _POD_READY},
            delay={"durationMilliseconds": 500},
        ),
        _stage(
            # A kubelet marks its pods Ready again once their node is back; KWOK has no kubelet,
            # so a pod the node lifecycle controller marked not Ready (its node's lease lapsed)
            # would stay so. ContainersReady (untouched by that controller) tells it from a crash.
            "pod-ready-again",
            "Pod",
            [_NOT_DELETED, _RUNNING, {**pod_ready, "operator": "NotIn"}, containers_ready],
            {"statusTemplate": _POD_READY_AGAIN},
            delay={"durationMilliseconds": 500},
        ),
        _stage(
            "pod-complete",
            "Pod",
            [
                _NOT_DELETED,
                _RUNNING,
                pod_ready,
                _FAIL_NOT_REQUESTED,
                {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]},
            ],
            {"statusTemplate": _pod_terminated(0, "Completed", "Succeeded")},
            delay=_RUN_DELAY,
        ),
        _stage(
            "pod-fail",
            "Pod",
            [
                _NOT_DELETED,
                _RUNNING,
                pod_ready,
                _FAIL_REQUESTED,
                {"key": ".spec.restartPolicy", "operator": "In", "values": ["Never"]},
            ],
            {"statusTemplate": _pod_terminated(1, "Error", "Failed")},
            delay=_RUN_DELAY,
        ),
        _stage(
            "pod-crash-loop",
            "Pod",
            [
                _NOT_DELETED,
                _RUNNING,
                pod_ready,
                _FAIL_REQUESTED,
                {"key": ".spec.restartPolicy", "operator": "NotIn", "values": ["Never"]},
            ],
            {"statusTemplate": _POD_CRASH_LOOP},
            delay=_RUN_DELAY,
        ),
        _stage(
            "pod-delete",
            "Pod",
            [{"key": ".metadata.deletionTimestamp", "operator": "Exists"}],
            {"delete": True},
        ),
    ]


def configuration(pod_cidr: str = "10.244.0.1/16") -> dict[str, Any]:
    """The KwokConfiguration document."""
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "cidr": pod_cidr,
            "manageAllNodes": False,
            "manageNodesWithLabelSelector": KWOK_NODE_SELECTOR,
            "nodeLeaseDurationSeconds": 40,
            # KWOK's documented defaults, spelled out: a config file does not get them.
            "podPlayStageParallelism": 4,
            "nodePlayStageParallelism": 4,
            "nodeLeaseParallelism": 4,
            "podsOnNodeSyncParallelism": 1,
            "enablePodsOnNodeSyncListPager": True,
        },
    }


def config_yaml() -> str:
    """KWOK's --config file: the configuration followed by every Stage, as YAML documents."""
    return yaml.safe_dump_all([configuration(), *stages()], sort_keys=False)
