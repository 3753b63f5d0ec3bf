"""The `kiln` command line: one entry point whose subcommands live in the modules that own them."""

from __future__ import annotations

import importlib
from typing import Any

import click

# Subcommand name -> "module:attribute" of a click command. Imported only when used, so
# `kiln crds` never pays for importing kopf, and `kiln local` never imports the operator.
SUBCOMMANDS: dict[str, str] = {
    "crds": "kiln.api.crdgen:crds",
    "local": "kiln.local.cli:local",
    "operator": "kiln.controller.cli:operator_command",
    "topology-agent": "kiln.topology.agent:topology_agent",
    "autoscaler": "kiln_autoscaler.cli:autoscaler",
    "demo": "kiln.demo:demo",
    "images": "kiln.images.cli:images",
}


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise click.ClickException(
                f"`kiln {cmd_name}` is unavailable: {error}. Install the missing extra "
                f"(pip install 'kiln[engine]') or update your checkout."
            ) from error
        command: Any = getattr(module, attribute)
        return command


@click.group(cls=LazyGroup)
@click.version_option(package_name="kiln")
def main() -> None:
    """Kiln: build LLM engines once, place them on NVLink, scale them on time to first token."""
