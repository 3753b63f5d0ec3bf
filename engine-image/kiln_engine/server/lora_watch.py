"""Serving the LoRA adapters a file lists (the ConfigMap the operator mounts): read at start, then
polled, and a change swapped in between engine steps, so that adding, replacing or removing an
adapter needs no restart and drops no request.

The file is JSON, `{"adapters": [{"name": ..., "source": ...}]}`, sources as `--lora` takes them (a
directory, pvc://, hf:// or s3://). Remote sources are downloaded off the engine thread, each into a
directory named by its source, so that a changed source is a new directory and a new version.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from kiln_engine.lora import AdapterError, check_adapter_name

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 5.0


def read_adapter_file(path: Path) -> list[tuple[str, str]]:
    """(name, source) pairs from an adapter file; AdapterError naming what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter file {path}: {exc}") from None
    entries = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise AdapterError(f'adapter file {path}: expected {{"adapters": [{{"name": ..., "source": ...}}]}}')
    modules: list[tuple[str, str]] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry.get("source"):
            raise AdapterError(f"adapter file {path}: each adapter needs a name and a source, got {entry!r}")
        check_adapter_name(entry["name"])
        modules.append((entry["name"], str(entry["source"])))
    names = [name for name, _ in modules]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter file {path}: adapter names must be unique, got {names}")
    return modules


def fetch_adapter(name: str, source: str) -> Path:
    """The local directory of an adapter's source: a path or pvc:// in place, hf:// and s3:// fetched."""
    from kiln_engine.build.source import fetch, work_dir

    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return fetch(source, work_dir() / "lora" / f"{name}-{digest}")


def fetch_adapters(
    modules: list[tuple[str, str]], known: dict[tuple[str, str], str] | None = None
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(name, local directory) of each adapter that could be fetched, and why the others could not.
    `known`: the directories of (name, source) pairs fetched before, reused without asking the
    source again (a source is immutable: a changed adapter is a new source)."""
    from kiln_engine.build.source import SourceError

    fetched: list[tuple[str, str]] = []
    failed: dict[str, str] = {}
    for name, source in modules:
        if known is not None and (name, source) in known:
            fetched.append((name, known[(name, source)]))
            continue
        try:
            fetched.append((name, str(fetch_adapter(name, source))))
        except (SourceError, OSError) as exc:
            log.error("cannot fetch LoRA adapter %r from %s: %s", name, source, exc)
            failed[name] = f"cannot fetch {source}: {exc}"
    return fetched, failed


# Swaps the engine's adapters to these (name, local directory) pairs, given those that could not be
# fetched (and why); returns every adapter not served, with why.
ApplyAdapters = Callable[[list[tuple[str, str]], dict[str, str]], Awaitable[dict[str, str]]]


class AdapterFileWatch:
    """Polls an adapter file and applies each new content; a bad file is logged and changes nothing."""

    def __init__(self, path: Path, apply: ApplyAdapters, served_text: str | None, interval_s: float) -> None:
        self.path = path
        self.apply = apply
        self.interval_s = interval_s
        self.seen_text = served_text  # the content served now (read at start)
        self.error: str | None = None  # why the newest content was not applied
        self.fetched: dict[tuple[str, str], str] = {}  # (name, source) -> local directory

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # the watch outlives a failed round; the next one tries again
                log.exception("applying LoRA adapter file %s failed", self.path)

    async def check(self) -> bool:
        """Apply the file if its content changed since the last look; True when it was applied."""
        try:
            text = self.path.read_text()
        except OSError as exc:
            self.error = f"cannot read {self.path}: {exc}"
            return False
        if text == self.seen_text:
            return False
        self.seen_text = text
        try:
            modules = read_adapter_file(self.path)
        except AdapterError as exc:
            self.error = str(exc)
            log.error("not applying LoRA adapter file: %s", exc)
            return False
        self.error = None
        fetched, fetch_failed = await asyncio.to_thread(fetch_adapters, modules, self.fetched)
        sources = dict(modules)
        self.fetched = {(name, sources[name]): directory for name, directory in fetched}
        failed = await self.apply(fetched, fetch_failed)
        served = sorted(name for name, _ in fetched if name not in failed)
        unserved = f"; not served: {sorted(failed)}" if failed else ""
        log.info("LoRA adapters now %s%s", served or "none", unserved)
        return True
