"""The operator's view of the cluster's nodes: one list on first use, kept current by the Node watch.

A cluster of thousands of nodes makes the list the operator's largest allocation, so it is made
once (reconcilers that need it meanwhile wait for that one list instead of each sending their own)
and read a page at a time, keeping only each node's topology; watch events that arrive while it
is being read are applied over it, so the list's older copies never replace them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kiln.placement import NodeTopology


class NodeCache:
    """Every node's topology by name, loaded by `list_nodes` on first use."""

    def __init__(self, list_nodes: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self._list_nodes = list_nodes
        self._lock = threading.Lock()  # guards the fields below; never held while listing
        self._loading = threading.Lock()  # one list at a time
        self._nodes: dict[str, NodeTopology] | None = None
        # Events that arrived during the list, by node name (None: deleted), applied after it.
        self._during_load: dict[str, NodeTopology | None] | None = None

    def changed(self, event_type: str | None, node: Mapping[str, Any]) -> None:
        """A Node watch event."""
        name = str((node.get("metadata") or {}).get("name") or "")
        topology = None if event_type == "DELETED" else NodeTopology.from_node(node)
        with self._lock:
            if self._nodes is not None:
                if topology is None:
                    self._nodes.pop(name, None)
                else:
                    self._nodes[name] = topology
            elif self._during_load is not None:
                self._during_load[name] = topology
            # else: not loaded and no list under way: the first use lists every node

    def all(self) -> list[NodeTopology]:
        """Every node's topology, listing the nodes first if nothing has yet."""
        with self._lock:
            if self._nodes is not None:
                return list(self._nodes.values())
        with self._loading:
            with self._lock:
                if self._nodes is not None:  # another reconciler listed them while we waited
                    return list(self._nodes.values())
                self._during_load = {}
            try:
                loaded = {str(n["metadata"]["name"]): NodeTopology.from_node(n) for n in self._list_nodes()}
                with self._lock:
                    for name, topology in (self._during_load or {}).items():
                        if topology is None:
                            loaded.pop(name, None)
                        else:
                            loaded[name] = topology
                    self._nodes = loaded
                    return list(loaded.values())
            finally:
                with self._lock:
                    self._during_load = None
