"""Leader election over a coordination.k8s.io/v1 Lease: of several operator or autoscaler replicas, one acts.

The same protocol as client-go's leaderelection: the holder renews `renewTime` every retry period;
another candidate takes the Lease once `renewTime + leaseDurationSeconds` has passed. Writes use the
Lease's resourceVersion, so two candidates never both win a round.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from kubernetes import client

log = logging.getLogger(__name__)


def _micro_now(now: float) -> dt.datetime:
    stamp = dt.datetime.fromtimestamp(now, dt.UTC)
    # MicroTime is parsed with a fixed microsecond layout: never send a whole second.
    return stamp if stamp.microsecond else stamp.replace(microsecond=1)


class LeaseElector:
    """Acquires and renews one Lease for `identity`; `is_leader` says whether it may act now."""

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self.clock = clock
        self.last_renewed: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        """True while this candidate renewed the Lease within the renew deadline."""
        return self.last_renewed is not None and self.clock() - self.last_renewed < self.renew_deadline_s

    def try_acquire_or_renew(self) -> bool:
        """One election round: True when this candidate holds the Lease afterwards."""
        now = self.clock()
        stamp = _micro_now(now)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except client.ApiException as error:
            if error.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=int(self.lease_duration_s),
                    acquire_time=stamp,
                    renew_time=stamp,
                    lease_transitions=0,
                ),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except client.ApiException as create_error:
                if create_error.status == 409:
                    return False
                raise
            self.last_renewed = now
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        duration = spec.lease_duration_seconds or self.lease_duration_s
        renewed = spec.renew_time.timestamp() if spec.renew_time else None
        expired = renewed is None or now > renewed + duration
        if holder and holder != self.identity and not expired:
            self.last_renewed = None
            return False
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = stamp
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = int(self.lease_duration_s)
        spec.renew_time = stamp
        lease.spec = spec
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except client.ApiException as error:
            if error.status == 409:  # someone else wrote first
                self.last_renewed = None
                return False
            raise
        self.last_renewed = now
        return True

    def release(self) -> None:
        """Give the Lease up (on shutdown) so another replica takes over at once."""
        if self.last_renewed is None:
            return
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.lease_duration_seconds = 1
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except client.ApiException as error:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, error.reason)
        self.last_renewed = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception as error:  # keep electing through API errors
                log.warning("leader election round failed: %s", error)
            self._stop.wait(self.retry_period_s)

    def start(self) -> None:
        """Run election rounds every retry period in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="kiln-autoscaler-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop electing and release the Lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.release()
