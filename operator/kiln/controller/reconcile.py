"""The reconcilers: read the world, render the children, apply them, write status. Level-based.

`Reconciler.deployment` takes an LLMDeployment to its engine, workload, Service and status;
`Reconciler.engine` takes an LLMEngine to its one build Job and follows it. Both are idempotent and
start from what the cluster holds (never from what a previous run remembered), so a restarted
operator resumes where the last one stopped: a build Job has a fixed name and is found, not
recreated; the engine a workload runs is read from the workload itself.

Watch events land in an in-memory cache (`ObjectCache`, the informer of client-go) and queue the
object's key (`WorkQueue`); workers reconcile keys, reading from the cache and writing through the
API. One key is never reconciled by two workers at once, and a key queued during its own run is
run once more afterwards, so the last change is always seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from kiln import labels
from kiln.api.enginekey import build_setting_conflicts
from kiln.api.v1alpha1 import LLMDeployment, LLMEngine
from kiln.controller.kube import (
    CONFIGMAPS,
    DEPLOYMENTS,
    FIELD_MANAGER,
    JOBS,
    KINDS,
    LEADERWORKERSETS,
    LLMDEPLOYMENTS,
    LLMENGINES,
    LWS_CRD,
    NODES,
    PODDISRUPTIONBUDGETS,
    PODS,
    ROLEBINDINGS,
    SERVICEACCOUNTS,
    SERVICES,
    STATEFULSETS,
    Kind,
    Kube,
)
from kiln.controller.metrics import Metrics
from kiln.controller.nodes import NodeCache
from kiln.controller.workqueue import WorkQueue
from kiln.drift import Drift, drifted
from kiln.placement import LWS_GROUP_KEY, Placement, PlacementPolicy, ReplicaShape, plan
from kiln.placement.planner import cpu_placement
from kiln.render import build_job as render_build
from kiln.render import capacity_job as render_capacity
from kiln.render import engine as render_engine
from kiln.render import groups as render_groups
from kiln.render import router as render_router
from kiln.render import service as render_service
from kiln.render import serving as render_serving
from kiln.render import status as render_status
from kiln.render.common import BUILD_COMPONENT, BUILD_CONTAINER, SERVING_COMPONENT, Settings

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
ERROR_RETRY_SECONDS = 5.0
# A node that served no log (simulated, or a log not there yet) is asked again only this much later.
LOG_RETRY_SECONDS = 15.0
# Progress needs only the newest KILN_PROGRESS line: a short tail, bounded in bytes too.
BUILD_LOG_TAIL_LINES = 50
BUILD_LOG_LIMIT_BYTES = 64 * 1024
APPLIED_ANNOTATION = "kiln.dev/applied-hash"  # digest of the rendering last applied to a child
# What the operator applies for a deployment's routers (get, create, patch, delete each).
ROUTER_KINDS = {
    kind.kind: kind for kind in (SERVICEACCOUNTS, ROLEBINDINGS, SERVICES, DEPLOYMENTS, PODDISRUPTIONBUDGETS)
}


@dataclass(frozen=True)
class Options:
    """How the operator runs (from `kiln operator run`)."""

    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    engine_retention_seconds: float = 24 * 3600.0
    resync_seconds: float = 600.0
    workers: int = 16
    # While a build Job runs, its engine is reconciled and its pod's log tail read this often.
    build_poll_seconds: float = 5.0


# How long an answer of the API outranks the watch before the watch is believed again (the stream may
# re-list past our version and never deliver it).
CONFIRM_SECONDS = 30.0
# Versions of an object the watch delivered, remembered so a late answer of the API is seen as old.
SEEN_VERSIONS = 16
# Applies over a diffed copy of a drifted child before applying over whatever is there (edits
# landing faster than a re-read for this many rounds).
DRIFT_APPLY_ATTEMPTS = 3


@dataclass(frozen=True)
class _Copy:
    """One object as compact JSON, decoded on each read: a fraction of its dict's memory, and the
    operator holds every child of thousands of deployments while a reconcile reads a few."""

    data: bytes
    uid: str | None
    version: str | None

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> _Copy:
        return cls(json.dumps(dict(obj), separators=(",", ":")).encode(), _uid(obj), _version(obj))

    def value(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.data)
        return decoded


@dataclass
class _Held:
    copy: _Copy
    # The API answered a write of ours with this copy and the watch has not delivered its version
    # yet: until it does, the stream's events are older than what we hold.
    awaiting: str | None = None
    since: float = 0.0
    seen: deque[str] = field(default_factory=lambda: deque(maxlen=SEEN_VERSIONS))  # by the watch
    # The last event the stream delivered while we held our answer: the newest copy once the
    # confirm window has passed without our version (the watch re-listed past it).
    later: _Copy | None = None


class ObjectCache:
    """The latest copy of each watched object, by (kind, namespace, name), fed by watch events and
    by the API's answers to this process's own reads and writes.

    resourceVersion is opaque (the API forbids ordering or parsing it), so copies are never ranked
    by it: the watch stream is in order, and an answer of the API is fresher than any event still
    in flight, until the stream delivers that answer's own version (compared for equality only).
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, confirm_seconds: float = CONFIRM_SECONDS
    ) -> None:
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str, str], _Held] = {}
        self._clock = clock
        self._confirm_seconds = confirm_seconds

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
        meta = obj.get("metadata") or {}
        return (str(obj.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))

    def put(self, obj: Mapping[str, Any]) -> None:
        """The API's answer to a write of ours: the freshest copy, until the watch catches up."""
        key, version = self._key(obj), _version(obj)
        with self._lock:
            held = self._objects.get(key)
            if held is None or held.copy.uid != _uid(obj):
                self._objects[key] = _Held(_Copy.of(obj), awaiting=version, since=self._clock())
            elif version in held.seen:
                return  # the watch gave this version already, or has moved past it
            elif version != held.copy.version:
                held.copy, held.awaiting, held.since, held.later = _Copy.of(obj), version, self._clock(), None

    def put_read(self, obj: Mapping[str, Any]) -> None:
        """The API's answer to a read (get, list): kept only where the watch has given nothing yet,
        and replaced by the watch's next event. A read can be older than an event in flight, and
        its version one the watch never delivers (a watch that started after it)."""
        key = self._key(obj)
        with self._lock:
            held = self._objects.get(key)
            if held is None or held.copy.uid != _uid(obj):
                self._objects[key] = _Held(_Copy.of(obj))

    def observe(self, obj: Mapping[str, Any]) -> bool:
        """A watch event: it replaces the copy, unless that copy is an answer the stream has not
        reached. False when it did not (the event is kept: `get` returns it once the confirm window
        has passed without our version, so the caller looks again then)."""
        key, version = self._key(obj), _version(obj)
        with self._lock:
            held = self._objects.get(key)
            if held is None or held.copy.uid != _uid(obj):
                held = self._objects[key] = _Held(_Copy.of(obj))
            elif held.awaiting is not None and held.awaiting != version and not self._expired(held):
                held.later = _Copy.of(obj)  # from before our answer's version, or past it: time tells
                if version is not None:
                    held.seen.append(version)
                return False
            held.copy, held.awaiting, held.later = _Copy.of(obj), None, None
            if version is not None:
                held.seen.append(version)
            return True

    def _expired(self, held: _Held) -> bool:
        return self._clock() - held.since >= self._confirm_seconds

    @property
    def confirm_seconds(self) -> float:
        return self._confirm_seconds

    def drop(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._objects.pop((kind, namespace, name), None)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            held = self._objects.get((kind, namespace, name))
            if held is None:
                return None
            if held.later is not None and self._expired(held):
                held.copy, held.awaiting, held.later = held.later, None, None
            copy = held.copy
        return copy.value()  # decoded outside the lock

    def items(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            keys = [key for key in self._objects if key[0] == kind]
        return [obj for key in keys if (obj := self.get(*key)) is not None]


def _version(obj: Mapping[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return None if version is None else str(version)


def _uid(obj: Mapping[str, Any]) -> str | None:
    uid = (obj.get("metadata") or {}).get("uid")
    return None if uid is None else str(uid)


@dataclass
class _Index:
    """Which deployments use which engines, as last reconciled (rebuilt from a full list on resync)."""

    uses: dict[Key, set[str]] = field(default_factory=dict)  # deployment -> engine names it uses
    synced: bool = False  # a full list of deployments has been indexed since start

    def set(self, deployment: Key, engines: Iterable[str]) -> set[Key]:
        """Record `deployment`'s engines; returns the engines whose user count changed."""
        namespace = deployment[0]
        before = self.uses.get(deployment, set())
        after = set(engines)
        if after:
            self.uses[deployment] = after
        else:
            self.uses.pop(deployment, None)
        return {(namespace, name) for name in before ^ after}

    def users(self, engine: Key) -> list[str]:
        namespace, name = engine
        return sorted(dep for (ns, dep), used in self.uses.items() if ns == namespace and name in used)


def log_fetch_due(now: float, fetched_at: float | None, failed_at: float | None, interval: float) -> bool:
    """Whether a running build pod's log should be read again: every `interval` seconds, and
    after a failed read (a simulated node, a log not there yet) only once `LOG_RETRY_SECONDS` passed."""
    if failed_at is not None and now - failed_at < max(interval, LOG_RETRY_SECONDS):
        return False
    return fetched_at is None or now - fetched_at >= interval


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def _phase(engine: LLMEngine | None) -> str | None:
    return engine.status.phase if engine is not None and engine.status is not None else None


def _digest(manifest: Mapping[str, Any]) -> str:
    """A short hash of a rendering, so an unchanged one is not applied again."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _job_finished(job: Mapping[str, Any]) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def _engine_of(workload: Mapping[str, Any] | None) -> str | None:
    """The LLMEngine a workload's pods run (its pod template's engine label)."""
    if workload is None:
        return None
    spec = workload.get("spec") or {}
    # a Deployment's template, a LeaderWorkerSet's leader template, or a StatefulSet group summary's
    template = spec.get("template") or (spec.get("leaderWorkerTemplate") or {}).get("leaderTemplate") or {}
    return ((template.get("metadata") or {}).get("labels") or {}).get(labels.ENGINE_LABEL)


class Reconciler:
    """LLMDeployment and LLMEngine reconcilers sharing one API edge, node cache and engine index."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings | None = None,
        options: Options | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.kube = kube
        self.settings = settings or Settings()
        self.options = options or Options()
        self.metrics = metrics or kube.metrics
        self.clock = clock
        self.cache = ObjectCache()
        self.queue: WorkQueue[tuple[str, str, str]] = WorkQueue(self._handle, self.options.workers)
        self._lock = threading.Lock()
        self._nodes = NodeCache(lambda: self.kube.iterate(NODES))
        self._index = _Index()
        self._no_logs: dict[str, float] = {}  # "ns/pod" -> when its node last served no log
        self._logs: dict[str, tuple[float, str]] = {}  # "ns/pod" -> (fetched at, log tail)
        self._log_pending: set[str] = set()
        self._log_pool = ThreadPoolExecutor(2, thread_name_prefix="kiln-build-logs")
        self._lws_checked = 0.0
        self._complete: set[str] = set()  # child kinds fully listed: a cache miss means absent

    # ------------------------------------------------------------ entry points

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self._log_pool.shutdown(wait=False, cancel_futures=True)

    def deployment(self, namespace: str, name: str, again_after: float = 0.0) -> None:
        """Queue an LLMDeployment for reconciling (and once more after `again_after` s, if set)."""
        self.queue.add(("LLMDeployment", namespace, name))
        if again_after:
            self.queue.add(("LLMDeployment", namespace, name), delay=again_after)

    def engine(self, namespace: str, name: str, again_after: float = 0.0) -> None:
        """Queue an LLMEngine for reconciling (and once more after `again_after` s, if set)."""
        self.queue.add(("LLMEngine", namespace, name))
        if again_after:
            self.queue.add(("LLMEngine", namespace, name), delay=again_after)

    def observe(self, obj: Mapping[str, Any], deleted: bool = False) -> float:
        """A watch event's object: keep the cache current. Returns when to reconcile once more: 0, or
        just after the cache's confirm window when it kept an answer of ours over this event (the
        event is the newest copy if the watch never delivers our version, and no event may follow)."""
        meta = obj.get("metadata") or {}
        if deleted:
            self.cache.drop(str(obj.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
            return 0.0
        return 0.0 if self.cache.observe(obj) else self.cache.confirm_seconds + 1.0

    def node_changed(self, event_type: str | None, node: Mapping[str, Any]) -> None:
        """Keep the node cache current from the Node watch."""
        self._nodes.changed(event_type, node)

    def forget_deployment(self, namespace: str, name: str) -> None:
        """A deleted LLMDeployment: its children go with it (owner references); its engines lose a user."""
        with self._lock:
            changed = self._index.set((namespace, name), ())
        for engine_key in changed:
            self.engine(*engine_key)

    def engine_deleted(self, namespace: str, name: str) -> None:
        """An LLMEngine is gone: deployments that used it reconcile (and ask for a new one)."""
        with self._lock:
            users = self._index.users((namespace, name))
        for user in users:
            self.deployment(namespace, user)

    def resync(self) -> None:
        """The level-based safety net: index every deployment, reconcile every engine and deployment."""
        deployments = self._list(LLMDEPLOYMENTS)
        with self._lock:
            self._index.uses.clear()
            for obj in deployments:
                meta = obj.get("metadata") or {}
                self._index.set((meta["namespace"], meta["name"]), self._engines_named_by(obj))
            self._index.synced = True
        for obj in self._list(LLMENGINES):
            self.cache.put_read(obj)
            meta = obj["metadata"]
            self.engine(meta["namespace"], meta["name"])
        for obj in deployments:
            self.cache.put_read(obj)
            meta = obj["metadata"]
            self.deployment(meta["namespace"], meta["name"])
        # Once Kiln's children are listed, the watches keep them current: a child missing from the
        # cache does not exist, and need not be asked for (a false miss costs only a create that
        # finds the object, or an apply that changes nothing).
        for kind, components in (
            (DEPLOYMENTS, f"{SERVING_COMPONENT},{render_router.ROUTER_COMPONENT}"),
            (STATEFULSETS, SERVING_COMPONENT),
            (SERVICES, SERVING_COMPONENT),
            (CONFIGMAPS, render_serving.LORA_COMPONENT),
            (JOBS, BUILD_COMPONENT),
        ):
            if kind.kind in self._complete:
                continue
            managed = f"{labels.MANAGED_BY}={labels.MANAGED_BY_VALUE}"
            selector = f"{managed},{labels.COMPONENT_LABEL} in ({components})"
            for obj in self._list(kind, selector):
                self.cache.put_read(obj)
            with self._lock:
                self._complete.add(kind.kind)

    def poll_building(self) -> None:
        """Follow engines still building (progress, a pod waiting for a node) between events."""
        for obj in self.cache.items("LLMEngine"):
            if ((obj.get("status") or {}).get("phase")) not in (None, "Pending", "Building"):
                continue
            meta = obj["metadata"]
            job = self.cache.get("Job", meta["namespace"], render_build.job_name(meta["name"]))
            # A Job that finished wakes its engine by its own event; only running ones are polled.
            if job is None or not _job_finished(job):
                self.engine(meta["namespace"], meta["name"])

    # ------------------------------------------------------------ plumbing

    def _handle(self, key: tuple[str, str, str]) -> None:
        kind, namespace, name = key
        started = time.monotonic()
        try:
            if kind == "LLMDeployment":
                self._deployment(namespace, name)
            else:
                self._engine(namespace, name)
        except client.ApiException as error:
            if error.status == 404 and self._gone(kind, namespace, name):
                return  # deleted while reconciling: nothing left to do
            self._failed(key, f"Api{error.status}", error, trace=False)
        except Exception as error:
            self._failed(key, type(error).__name__, error, trace=True)
        finally:
            self.metrics.reconcile_duration.labels(kind).observe(time.monotonic() - started)

    def _failed(self, key: tuple[str, str, str], reason: str, error: Exception, trace: bool) -> None:
        kind, namespace, name = key
        self.metrics.reconcile_errors.labels(kind, reason).inc()
        log.warning(
            "reconcile of %s %s/%s failed (retrying in %.0f s): %s",
            kind,
            namespace,
            name,
            ERROR_RETRY_SECONDS,
            error,
            exc_info=trace,
        )
        self.queue.add(key, delay=ERROR_RETRY_SECONDS)

    def _gone(self, kind: str, namespace: str, name: str) -> bool:
        resource = LLMDEPLOYMENTS if kind == "LLMDeployment" else LLMENGINES
        if self.kube.get(resource, namespace, name) is None:
            self.cache.drop(kind, namespace, name)
            return True
        return False

    def _get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """The object from the watch cache, else from the API."""
        held = self.cache.get(kind.kind, namespace, name)
        if held is not None or kind.kind in self._complete:
            return held
        found = self.kube.get(kind, namespace, name)
        if found is not None:
            self.cache.put_read(found)
        return found

    def _wrote(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Keep what the API answered to a write (fresher than the watch, for a moment)."""
        self.cache.put(obj)
        return dict(obj)

    def _list(self, kind: Kind, selector: str | None = None) -> list[dict[str, Any]]:
        if not self.options.namespaces:
            return self.kube.list(kind, None, selector)
        return [
            item
            for namespace in self.options.namespaces
            for item in self.kube.list(kind, namespace, selector)
        ]

    def _lws_installed(self) -> bool:
        if not self.settings.lws_installed and time.monotonic() - self._lws_checked > 30:
            self._lws_checked = time.monotonic()
            if self.kube.crd_installed(LWS_CRD):
                self.settings = Settings(**{**self.settings.__dict__, "lws_installed": True})
        return self.settings.lws_installed

    def _engines_named_by(self, obj: Mapping[str, Any]) -> set[str]:
        """Engines a deployment object uses: the one its spec needs, and those its status names."""
        names: set[str] = set()
        status = obj.get("status") or {}
        for ref in ("engine", "pendingEngine"):
            if (status.get(ref) or {}).get("name"):
                names.add(str(status[ref]["name"]))
        try:
            parsed = LLMDeployment.model_validate(obj)
            names.add(render_engine.engine_identity(parsed, self.settings.runtime_version).name)
        except ValidationError:
            pass
        return names

    # ------------------------------------------------------------ LLMDeployment

    def _deployment(self, namespace: str, name: str) -> None:
        obj = self._get(LLMDEPLOYMENTS, namespace, name)
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            self.forget_deployment(namespace, name)
            return
        try:
            deployment = LLMDeployment.model_validate(obj)
        except ValidationError as error:
            invalid = ("InvalidSpec", f"the spec does not parse: {error.errors()[0].get('msg')}")
            self._write_deployment_status(
                obj, None, render_status.DeploymentObservation(None, problem=invalid)
            )
            return
        identity = render_engine.engine_identity(deployment, self.settings.runtime_version)
        desired = self._desired_engine(obj, deployment, identity)

        current = self._get(DEPLOYMENTS, namespace, name)
        if current is None and self._lws_installed():
            current = self._get(LEADERWORKERSETS, namespace, render_serving.lws_name(name))
        if current is None and (groups := self._group_sets(namespace, name)):
            current = render_groups.group_workload(groups, deployment.spec.replicas)
        running_name = _engine_of(current)
        running: LLMEngine | None = desired if running_name == identity.name else None
        if running_name and running is None:
            running_obj = self._get(LLMENGINES, namespace, running_name)
            running = LLMEngine.model_validate(running_obj) if running_obj is not None else None
        # The engine to run: the desired one once built; until then the one running now (it keeps
        # serving while its replacement builds), if it is still a Ready engine.
        if _phase(desired) == "Ready":
            serve: LLMEngine | None = desired
        else:
            serve = running if _phase(running) == "Ready" else None
        placement = self._placement(deployment, serve or desired)
        problem: tuple[str, str] | None = None
        workload, serving = current, running if current is not None else None
        if serve is not None and (placement is None or placement.feasible):
            try:
                workload = self._apply_serving(obj, deployment, serve, placement, current)
                serving = serve
            except render_serving.WorkloadUnavailable as unavailable:
                problem = (unavailable.reason, unavailable.message)

        pods: list[dict[str, Any]] = []
        if workload is not None and not render_status.rolled_out(workload):
            pods = self.kube.list(PODS, namespace, render_serving.selector_string(name))
        router = self._get(DEPLOYMENTS, namespace, render_router.router_name(name))
        seen = render_status.DeploymentObservation(
            pods=pods,
            router=router if deployment.spec.router.enabled else None,
            desired=identity,
            desired_engine=desired,
            serving=serving if workload is not None else None,
            workload=workload,
            placement=placement,
            problem=problem,
        )
        self._write_deployment_status(obj, deployment, seen)
        if seen.serving is not None and render_capacity.needs_capacity(seen.serving):
            self._measure_capacity(name, deployment.spec.serving.port, seen.serving)
        used = {identity.name}
        if seen.serving is not None:
            used.add(str(seen.serving.metadata.name))
        with self._lock:
            changed = self._index.set((namespace, name), used)
        for engine_key in changed:
            self.engine(*engine_key)

    def _desired_engine(
        self, obj: Mapping[str, Any], deployment: LLMDeployment, identity: render_engine.EngineIdentity
    ) -> LLMEngine:
        """The LLMEngine the spec needs: found (shared with other deployments) or created."""
        namespace = str(deployment.metadata.namespace)
        found = self._get(LLMENGINES, namespace, identity.name)
        if found is None:
            found, created = self.kube.create(render_engine.engine(deployment, self.settings.runtime_version))
            self._wrote(found)
            if created:
                self.kube.event(
                    obj, "EngineCreated", f"Created LLMEngine {identity.name} (key {identity.key})"
                )
        engine = LLMEngine.model_validate(found)
        in_status = ((obj.get("status") or {}).get("engine") or {}).get("name")
        pending = ((obj.get("status") or {}).get("pendingEngine") or {}).get("name")
        if _phase(engine) == "Ready" and identity.name not in (in_status, pending):
            self.kube.event(obj, "EngineReused", f"Using LLMEngine {identity.name}, already built")
        wanted = render_engine.desired_engine_spec(deployment, self.settings.runtime_version)
        differing = build_setting_conflicts(engine.spec, wanted)
        if differing and identity.name not in (in_status, pending):
            creator = (engine.metadata.annotations or {}).get(render_engine.CREATED_FOR_ANNOTATION, "?")
            self.kube.event(
                obj,
                "EngineSharedWithOtherBuildSettings",
                f"LLMEngine {identity.name} (same artifact) was created for {creator} with other "
                f"{', '.join(differing)} than {deployment.metadata.name}'s; it is shared as it was built",
                "Warning",
            )
        return engine

    def _measure_capacity(self, deployment: str, port: int, engine: LLMEngine) -> None:
        """Measure an engine the build could not, once, on the first Ready replica serving it: create
        the capacity Job against its leader, then copy its result into the engine's status."""
        namespace, name = str(engine.metadata.namespace), str(engine.metadata.name)
        job_name = render_capacity.job_name(name)
        job = self._get(JOBS, namespace, job_name)
        if job is None:
            selector = render_serving.selector_string(deployment)
            pods = self.kube.list(PODS, namespace, f"{selector},{labels.ENGINE_LABEL}={name}")
            ip = render_capacity.ready_leader_ip(pods)
            if ip is not None:
                url = f"http://{ip}:{port}"
                job, created = self.kube.create(
                    render_capacity.capacity_job(engine, self.settings, deployment, url)
                )
                self._wrote(job)
                if created:
                    self.kube.event(
                        engine.to_wire(), "CapacityMeasuring", f"Created {job_name} against {url}"
                    )
            return
        pods = self.kube.list(PODS, namespace, f"job-name={job_name}")
        latest = max(pods, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""), default=None)
        previous = engine.status.to_wire() if engine.status is not None else {}
        wanted = render_capacity.measured_status(previous, job, latest, self.clock())
        patch = render_status.status_patch(previous, wanted) if wanted is not None else None
        if wanted is None or patch is None:
            return
        self._wrote(self.kube.patch_status(LLMENGINES, namespace, name, patch))
        mark = render_status.find_condition(wanted.get("conditions"), render_capacity.CONDITION) or {}
        self.kube.event(engine.to_wire(), str(mark.get("reason")), str(mark.get("message")),
                        "Normal" if mark.get("status") == "True" else "Warning")  # fmt: skip

    def _apply_serving(
        self,
        obj: Mapping[str, Any],
        deployment: LLMDeployment,
        engine: LLMEngine,
        placement: Placement | None,
        current: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Apply the workload running `engine` and its Service; returns the workload as applied."""
        namespace, name = str(deployment.metadata.namespace), str(deployment.metadata.name)
        multi_node = placement is not None and placement.multi_node
        lws = multi_node and self._lws_installed()
        inputs = render_serving.ServingInputs(deployment, engine, placement, self.settings)
        running_name = _engine_of(current)
        self._apply_lora_adapters(obj, deployment)  # before the pods that mount it
        if multi_node and not lws:
            workload = self._apply_groups(inputs)
            manifest: dict[str, Any] = workload
        else:
            manifest = render_serving.workload(inputs)
            workload = self._apply_if_changed(manifest, current, obj)
        self._apply_if_changed(
            render_service.service(deployment, multi_node), self._get(SERVICES, namespace, name), obj
        )
        self._apply_router(obj, deployment, multi_node)
        if current is None or current.get("kind") != manifest["kind"]:
            self.kube.event(
                obj, "WorkloadCreated", f"Created {manifest['kind']} {name} running {engine.metadata.name}"
            )
        elif running_name != engine.metadata.name:
            self.kube.event(
                obj,
                "RollingOver",
                f"Rolling {name} over from engine {running_name} to {engine.metadata.name}",
            )
        if (
            current is not None
            and current.get("kind") != manifest["kind"]
            and render_status.rolled_out(workload)
        ):
            # The replica shape changed kind (single node <-> multi-node): the old workload served
            # until the new one was ready.
            if current.get("kind") == "LeaderWorkerSet":
                self.kube.delete(LEADERWORKERSETS, namespace, render_serving.lws_name(name))
            elif current.get("kind") == render_groups.GROUPS_KIND:
                for group_set in self._group_sets(namespace, name):
                    self.kube.delete(STATEFULSETS, namespace, group_set["metadata"]["name"])
                self.kube.delete(SERVICES, namespace, render_groups.ranks_service_name(name))
            else:
                self.kube.delete(DEPLOYMENTS, namespace, name)
        return workload

    def _apply_lora_adapters(self, obj: Mapping[str, Any], deployment: LLMDeployment) -> None:
        """Apply the adapter list the serving pods poll (a change reaches running pods, no rollout);
        delete it once the deployment serves no LoRA (pods still on the old template keep the file
        they have)."""
        namespace, name = str(deployment.metadata.namespace), str(deployment.metadata.name)
        wanted = render_serving.lora_config_map(deployment)
        config_name = render_serving.lora_config_map_name(name)
        live = self._get(CONFIGMAPS, namespace, config_name)
        if wanted is not None:
            self._apply_if_changed(wanted, live, obj)
        elif live is not None:
            self.kube.delete(CONFIGMAPS, namespace, config_name)

    def _apply_router(self, obj: Mapping[str, Any], deployment: LLMDeployment, multi_node: bool) -> None:
        """Apply the routers of a deployment that asks for them; delete those of one that no longer
        does (the Service already selects the serving pods again)."""
        namespace, name = str(deployment.metadata.namespace), str(deployment.metadata.name)
        if deployment.spec.router.enabled:
            wanted = render_router.router_objects(deployment, self.settings, multi_node)
            for manifest in wanted:
                live = self._get(ROUTER_KINDS[manifest["kind"]], namespace, manifest["metadata"]["name"])
                self._apply_if_changed(manifest, live, obj)
            budget = render_router.router_name(name)
            if render_router.disruption_budget(deployment) is None and self._get(
                PODDISRUPTIONBUDGETS, namespace, budget
            ):
                self.kube.delete(PODDISRUPTIONBUDGETS, namespace, budget)  # down to one router
            return
        if self._get(DEPLOYMENTS, namespace, render_router.router_name(name)) is None:
            return  # never had routers (the watch cache is complete for Kiln's Deployments)
        self.kube.delete(DEPLOYMENTS, namespace, render_router.router_name(name))
        self.kube.delete(SERVICES, namespace, render_router.engines_service_name(name))
        for kind in (PODDISRUPTIONBUDGETS, ROLEBINDINGS, SERVICEACCOUNTS):
            self.kube.delete(kind, namespace, render_router.router_name(name))
        self.kube.event(obj, "RouterRemoved", f"Removed the routers of {name}; the Service selects replicas")

    def _group_sets(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The StatefulSets of a deployment's pod groups (multi-node replicas without LeaderWorkerSet)."""
        if STATEFULSETS.kind in self._complete:
            found = [
                item
                for item in self.cache.items(STATEFULSETS.kind)
                if item["metadata"].get("namespace") == namespace
                and (item["metadata"].get("labels") or {}).get(labels.DEPLOYMENT_LABEL) == name
            ]
        else:
            found = self.kube.list(STATEFULSETS, namespace, render_serving.selector_string(name))
        return sorted(found, key=lambda item: str(item["metadata"]["name"]))

    def _apply_groups(self, inputs: render_serving.ServingInputs) -> dict[str, Any]:
        """Apply a multi-node deployment's pod groups (two StatefulSets per replica) and their headless
        Service, delete groups beyond spec.replicas, and recreate one group left on an old template;
        returns the groups summed up as one workload."""
        deployment = inputs.deployment
        namespace, name = str(deployment.metadata.namespace), str(deployment.metadata.name)
        replicas = deployment.spec.replicas
        ranks = render_groups.ranks_service(inputs)
        self._apply_if_changed(ranks, self._get(SERVICES, namespace, ranks["metadata"]["name"]))
        live = {item["metadata"]["name"]: item for item in self._group_sets(namespace, name)}
        for replica in range(replicas):
            for manifest in render_groups.group_statefulsets(inputs, replica):
                set_name = manifest["metadata"]["name"]
                live[set_name] = self._apply_if_changed(manifest, live.get(set_name))
        for stale in render_groups.stale_statefulsets(list(live.values()), replicas):
            self.kube.delete(STATEFULSETS, namespace, stale)
        summary = render_groups.group_workload(list(live.values()), replicas)
        if not render_status.rolled_out(summary):
            pods = self.kube.list(PODS, namespace, render_serving.selector_string(name))
            for pod in render_groups.pods_to_recreate(list(live.values()), pods, replicas):
                self.kube.delete(PODS, namespace, pod)
        return summary

    def _apply_if_changed(
        self, manifest: dict[str, Any], live: Mapping[str, Any] | None, owner: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Server-side apply, skipped when the live object already carries this exact rendering and no
        other field manager has taken a field of it over (drift, which the forced apply takes back;
        the owner gets a DriftReverted event naming the fields and who set them)."""
        digest = _digest(manifest)
        manifest["metadata"].setdefault("annotations", {})[APPLIED_ANNOTATION] = digest
        drift: list[Drift] = []
        if live is not None:
            same = ((live.get("metadata") or {}).get("annotations") or {}).get(APPLIED_ANNOTATION) == digest
            # Diffed even when the rendering changed: the forced apply of a new rendering takes back
            # every hand edit too, and an edit it takes back must be named.
            drift = drifted(live, manifest, FIELD_MANAGER)
            # Someone scaling the child directly is drift the next apply undoes.
            wanted_replicas = (manifest.get("spec") or {}).get("replicas")  # ServiceAccounts have no spec
            replicas_kept = (live.get("spec") or {}).get("replicas") == wanted_replicas
            if same and not drift and replicas_kept:
                return dict(live)
        if not drift or owner is None or live is None:
            return self._wrote(self.kube.apply(manifest))
        applied, drift = self._revert_drift(manifest, live, drift)
        if drift:
            edits = "; ".join(d.describe() for d in drift)
            what = f"{manifest['kind']} {manifest['metadata']['name']}"
            self.kube.event(owner, "DriftReverted", f"{what}: put back {edits}", "Warning")
        return applied

    def _revert_drift(
        self, manifest: dict[str, Any], live: Mapping[str, Any], drift: list[Drift]
    ) -> tuple[dict[str, Any], list[Drift]]:
        """Apply over exactly the copy whose drift the event will name. The forced apply takes back
        every foreign field of the object as it is then, so applying over a newer version than the
        one diffed (the watch cache lags quick edits) would revert an edit the event never names;
        the API refuses that (409), and the newer object is read and diffed instead."""
        kind = KINDS[manifest["kind"]]
        namespace, name = manifest["metadata"].get("namespace"), manifest["metadata"]["name"]
        for _ in range(DRIFT_APPLY_ATTEMPTS):
            version = (live.get("metadata") or {}).get("resourceVersion")
            try:
                return self._wrote(self.kube.apply(manifest, over_version=version)), drift
            except client.ApiException as error:
                if error.status != 409:
                    raise
            fresh = self.kube.get(kind, namespace, name)
            if fresh is None:
                break
            live = fresh
            drift = drifted(live, manifest, FIELD_MANAGER)
        return self._wrote(self.kube.apply(manifest)), drift

    def _placement(self, deployment: LLMDeployment, engine: LLMEngine) -> Placement | None:
        gpu = deployment.spec.gpu
        shape = ReplicaShape(
            tensor=engine.spec.parallelism.tensor,
            pipeline=engine.spec.parallelism.pipeline,
            product=gpu.product if gpu is not None else None,
            memory_mib=gpu.memory_mib if gpu is not None else None,
        )
        # Pods of one group carry LeaderWorkerSet's group key, or Kiln's where StatefulSets make groups.
        group_key = LWS_GROUP_KEY if self._lws_installed() else render_groups.GROUP_LABEL
        if gpu is None:
            return cpu_placement(shape, group_key)
        return plan(shape, self._nodes.all(), PlacementPolicy.from_spec(deployment.spec, group_key))

    def _write_deployment_status(
        self,
        obj: Mapping[str, Any],
        deployment: LLMDeployment | None,
        seen: render_status.DeploymentObservation,
    ) -> None:
        meta = obj["metadata"]
        previous = dict(obj.get("status") or {})
        if deployment is None:
            generation = meta.get("generation")
            wanted: dict[str, Any] = {
                "phase": "Failed",
                "observedGeneration": generation,
                "conditions": [
                    render_status.condition(
                        "Ready",
                        False,
                        *(seen.problem or ("InvalidSpec", "")),
                        generation,
                        self.clock(),
                        previous.get("conditions"),
                    ),
                ],
            }
        else:
            wanted = render_status.deployment_status(deployment, seen, self.clock())
        patch = render_status.status_patch(previous, wanted)
        if patch is None:
            return
        self._wrote(self.kube.patch_status(LLMDEPLOYMENTS, meta["namespace"], meta["name"], patch))
        self._deployment_events(obj, previous, wanted)

    def _deployment_events(
        self, obj: Mapping[str, Any], previous: Mapping[str, Any], wanted: Mapping[str, Any]
    ) -> None:
        before, after = previous.get("phase"), wanted.get("phase")
        if before == after:
            return
        ready = render_status.find_condition(wanted.get("conditions"), "Ready") or {}
        degraded = render_status.find_condition(wanted.get("conditions"), "Degraded") or {}
        # Steps in between (Pending, Building, Deploying) already have their own Events
        # (EngineCreated, BuildStarted on the engine, WorkloadCreated, RollingOver).
        if after == "Ready":
            self.kube.event(obj, "Ready", str(ready.get("message") or "Serving"))
        elif after == "ScaledToZero":
            self.kube.event(obj, "ScaledToZero", str(ready.get("message") or after))
        elif after == "Degraded":
            self.kube.event(
                obj, str(degraded.get("reason") or after), str(degraded.get("message")), "Warning"
            )
        elif after == "Failed":
            self.kube.event(
                obj, str(ready.get("reason") or after), str(ready.get("message") or after), "Warning"
            )

    # ------------------------------------------------------------ LLMEngine

    def _engine(self, namespace: str, name: str) -> None:
        obj = self._get(LLMENGINES, namespace, name)
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            return
        engine = LLMEngine.model_validate(obj)
        previous = dict(obj.get("status") or {})
        phase = previous.get("phase")
        if phase in ("Ready", "Failed"):
            wanted: dict[str, Any] = dict(previous)
        else:
            wanted = self._follow_build(obj, engine)
        with self._lock:
            users = self._index.users((namespace, name)) if self._index.synced else None
        if users is not None:
            wanted["users"] = len(users)
            if users:
                wanted["lastUsedTime"] = None
            elif not wanted.get("lastUsedTime"):
                wanted["lastUsedTime"] = render_status.timestamp(self.clock())
        patch = render_status.status_patch(previous, wanted)
        if patch is not None:
            self._wrote(self.kube.patch_status(LLMENGINES, namespace, name, patch))
            self._engine_transition(obj, phase, wanted)
            step = wanted.get("step")
            if wanted.get("phase") == "Building" and step and step != previous.get("step"):
                self.kube.event(obj, "BuildProgress", f"Build step {step}: {wanted.get('progress', 0)}%")
        if users is not None and not users:
            self._collect_if_unused(obj, wanted)

    def _follow_build(self, obj: Mapping[str, Any], engine: LLMEngine) -> dict[str, Any]:
        namespace, name = str(engine.metadata.namespace), str(engine.metadata.name)
        job_name = render_build.job_name(name)
        job = self._get(JOBS, namespace, job_name)
        if job is None:
            gpus = render_build.build_gpus(engine, self._nodes.all() if engine.spec.gpu_product else ())
            job, created = self.kube.create(render_build.build_job(engine, self.settings, gpus))
            self._wrote(job)
            if created:
                self.metrics.builds_started.inc()
                self.kube.event(obj, "BuildStarted", f"Created build Job {job_name}")
        pods = self.kube.list(PODS, namespace, f"job-name={job_name}")
        latest = max(pods, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""), default=None)
        log_text = None
        if latest is not None:
            log_text = self._build_log(namespace, name, latest)
        seen = render_status.BuildObservation(job=job, pods=pods, log=log_text)
        status = render_status.engine_status(engine, seen, self.clock())
        if status.get("phase") in ("Ready", "Failed"):
            with self._lock:
                for pod in pods:
                    self._logs.pop(f"{namespace}/{pod['metadata']['name']}", None)
                    self._no_logs.pop(f"{namespace}/{pod['metadata']['name']}", None)
        return status

    def _build_log(self, namespace: str, engine: str, pod: Mapping[str, Any]) -> str | None:
        """The last log fetched from a build pod (for progress and the failure tail), and a refresh
        of it in the background while the pod runs, so a slow or absent kubelet never holds up a
        reconcile worker. A fetched log queues the engine again."""
        key = f"{namespace}/{pod['metadata']['name']}"
        running = (pod.get("status") or {}).get("phase") == "Running"
        with self._lock:
            fetched = self._logs.get(key)
            fetch = (
                running
                and key not in self._log_pending
                and log_fetch_due(
                    time.monotonic(),
                    fetched[0] if fetched else None,
                    self._no_logs.get(key),
                    self.options.build_poll_seconds,
                )
            )
            if fetch:
                self._log_pending.add(key)
        if fetch:
            self._log_pool.submit(self._fetch_log, key, namespace, engine, str(pod["metadata"]["name"]))
        return fetched[1] if fetched else None

    def _fetch_log(self, key: str, namespace: str, engine: str, pod: str) -> None:
        text = self.kube.pod_log(
            namespace,
            pod,
            BUILD_CONTAINER,
            tail_lines=BUILD_LOG_TAIL_LINES,
            limit_bytes=BUILD_LOG_LIMIT_BYTES,
        )
        with self._lock:
            self._log_pending.discard(key)
            if text is None:
                self._no_logs[key] = time.monotonic()
                return
            self._no_logs.pop(key, None)
            self._logs[key] = (time.monotonic(), text)
        self.engine(namespace, engine)

    def _engine_transition(self, obj: Mapping[str, Any], before: Any, wanted: Mapping[str, Any]) -> None:
        after = wanted.get("phase")
        if before == after:
            return
        if after == "Ready":
            self.metrics.builds_succeeded.inc()
            artifact = (wanted.get("artifact") or {}).get("uri")
            self.kube.event(obj, "BuildSucceeded", f"Engine built: {artifact}")
        elif after == "Failed":
            self.metrics.builds_failed.inc()
            failed = render_status.find_condition(wanted.get("conditions"), "Failed") or {}
            self.kube.event(obj, "BuildFailed", f"{failed.get('reason')}: {failed.get('message')}", "Warning")
        # Deployments waiting on this engine move on now rather than at the next resync.
        meta = obj["metadata"]
        with self._lock:
            users = self._index.users((meta["namespace"], meta["name"]))
        for user in users:
            self.deployment(meta["namespace"], user)

    def _collect_if_unused(self, obj: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """Delete an engine nobody has used for the retention time (its Job goes with it)."""
        since = _parse_time(status.get("lastUsedTime"))
        if since is None or self.clock() - since < timedelta(seconds=self.options.engine_retention_seconds):
            return
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        # The index may lag a deployment created a moment ago: ask the API before deleting.
        for other in self.kube.list(LLMDEPLOYMENTS, namespace):
            if name in self._engines_named_by(other):
                return
        if self.kube.delete(LLMENGINES, namespace, name, uid=meta.get("uid")):
            self.metrics.engines_collected.inc()
            log.info("deleted LLMEngine %s/%s: unused since %s", namespace, name, status.get("lastUsedTime"))
