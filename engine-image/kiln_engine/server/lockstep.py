"""Multi-rank serving (tensor and pipeline parallel): rank 0 runs the HTTP server and mirrors every
add/abort/step to the other ranks, which run the same engine in lockstep (same scheduler decisions,
their own weight shards and layers; see kiln_engine.pipeline for how stages pass a step along).

Control messages travel over a gloo group with a long timeout (an idle server sends nothing for as
long as it is idle); the tensors themselves use the engine's own process group (NCCL on GPUs).
Followers ignore SIGTERM: rank 0 drains, then tells them to stop; if rank 0 dies, they exit. A step
that fails on rank 0 leaves the followers out of step: the group is broken, and `on_failure` ends it.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kiln_engine.interface import Engine, EngineStats, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(days=365)
FOLLOWER_ENV = "KILN_TP_FOLLOWER"

# ("add", request_id, prompt_ids, params) | ("abort", request_id) | ("adapters", [(name, directory)])
Command = tuple[Any, ...]


def control_group() -> Any:
    """A gloo group over all ranks for control messages (every rank must call this, in order)."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


class LockstepEngine:
    """The Engine protocol on rank 0: each step first ships the adds/aborts since the last step."""

    def __init__(
        self,
        engine: Engine,
        group: Any,
        on_stop: Callable[[], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.group = group
        self.on_stop = on_stop  # before the followers are told to stop (the liveness watch stands down)
        self.on_failure = on_failure  # a failed step: the group restarts (rather than failing each request)
        self._pending: list[Command] = []

    def __getattr__(self, name: str) -> Any:  # tokenizer, eos ids, model_config … of the local engine
        return getattr(self.engine, name)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.add_request(request_id, prompt_token_ids, params)  # raises before anything is mirrored
        self._pending.append(("add", request_id, list(prompt_token_ids), params))

    def abort_request(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._pending.append(("abort", request_id))

    def set_adapters(self, modules: list[tuple[str, str]]) -> dict[str, str]:
        """The LoRA adapters from now on, on every rank (the directories are this pod's, shared by its
        ranks), in order with the adds around it so that every rank resolves a request alike."""
        failed: dict[str, str] = self.engine.set_adapters(modules)  # type: ignore[attr-defined]
        self._pending.append(("adapters", list(modules)))
        return failed

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def step(self) -> list[RequestOutput]:
        try:
            self._send(("step", self._pending))
            self._pending = []
            return self.engine.step()
        except Exception as exc:
            if self.on_failure is not None:
                self.on_failure(f"a step failed ({type(exc).__name__}: {exc})")
            raise

    def shutdown(self) -> None:
        """Tell the followers to exit (after the runner stopped stepping)."""
        if self.on_stop is not None:
            self.on_stop()
        self._send(("stop", self._pending))
        self._pending = []

    def _send(self, message: tuple[str, list[Command]]) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)


def follow(engine: Engine, group: Any) -> None:
    """A follower rank's loop: apply rank 0's commands, step when it steps, stop when it says so."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        kind, commands = box[0]
        for cmd in commands:
            if cmd[0] == "add":
                engine.add_request(cmd[1], cmd[2], cmd[3])
            elif cmd[0] == "abort":
                engine.abort_request(cmd[1])
            elif cmd[0] == "adapters":
                engine.set_adapters(cmd[1])  # type: ignore[attr-defined]
        if kind == "stop":
            return
        engine.step()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_group(rank: int, world_size: int, device: str) -> None:
    """Join the ranks' process group (env:// rendezvous: MASTER_ADDR, MASTER_PORT): NCCL on GPUs,
    gloo on CPU. The engine's loader then finds it joined and only adds its sub-groups."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size
    )


def ignore_termination_signals() -> None:
    """Followers outlive a SIGTERM sent to the whole process group; rank 0 stops them after draining."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
