"""`kiln demo`: the main job end to end on the local cluster (see docs/demo.md).

The click command lives in `kiln.demo.cli`; the environment (cluster with its real node, Kiln's
images, volumes, Kiln from its chart) in `kiln.demo.stack`, which the e2e tests share; the acts
(apply, build, serve, ask, autoscale) in `kiln.demo.story`.
"""

from __future__ import annotations

from kiln.demo.cli import demo

__all__ = ["demo"]
