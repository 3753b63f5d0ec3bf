"""The canonical prompt text of an OpenAI request body: what the router hashes for prefix affinity.

The text only has to be stable and prefix-preserving: a chat that grows by a turn must render to a
text that starts with the shorter chat's text, so both hash to the same leading blocks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

# Separators that cannot occur in JSON-escaped text, so that two different message lists never render
# to the same string.
_FIELD = "\x1f"
_RECORD = "\x1e"


class PromptError(ValueError):
    """The body has no prompt the router can read (the client gets a 400 with this message)."""


def completion_prompt(body: Mapping[str, object]) -> str:
    """The prompt of a /v1/completions body: a string, a list of strings, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        # one batch or one token-id list: its JSON is as prefix-stable as its items are
        return json.dumps(prompt, separators=(",", ":"))[1:-1]
    raise PromptError("'prompt' must be a non-empty string, list of strings or list of token ids")


def chat_prompt(body: Mapping[str, object]) -> str:
    """The messages (and tools, which engines render ahead of them) of a /v1/chat/completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    parts = []
    tools = body.get("tools")
    if tools:
        parts.append(json.dumps(tools, sort_keys=True, separators=(",", ":")) + _RECORD)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"messages[{i}] must be an object")
        parts.append(f"{message.get('role', '')}{_FIELD}{_content_text(message.get('content'))}{_RECORD}")
    return "".join(parts)


def _content_text(content: object) -> str:
    """A message's content: a string, or the text of its parts (other parts by their JSON)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) if isinstance(p, dict) and p.get("type") == "text" else json.dumps(p)
            for p in content
        )
    return json.dumps(content)
