"""The canonical prompt text of an OpenAI request body: what the router hashes for prefix affinity.

The text only has to be stable and prefix-preserving: a chat that grows by a turn must render to a
text that starts with the shorter chat's text, so both hash to the same leading blocks. A chat also
says how much of its text every later turn of the same conversation keeps: everything through its
first user message (tools, system prompt, first question), so that all turns of one conversation
share an affinity key while conversations that only share a system prompt can spread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

# Separators that cannot occur in JSON-escaped text, so that two different message lists never render
# to the same string.
_FIELD = "\x1f"
_RECORD = "\x1e"


class PromptError(ValueError):
    """The body has no prompt the router can read (the client gets a 400 with this message)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    conversation_chars: int | None = None  # a chat's text through its first user message


def completion_prompt(body: Mapping[str, object]) -> Prompt:
    """The prompt of a /v1/completions body: a string, a list of strings, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return Prompt(prompt)
    if isinstance(prompt, list) and prompt:
        # one batch or one token-id list: its JSON is as prefix-stable as its items are
        return Prompt(json.dumps(prompt, separators=(",", ":"))[1:-1])
    raise PromptError("'prompt' must be a non-empty string, list of strings or list of token ids")


def chat_prompt(body: Mapping[str, object]) -> Prompt:
    """The messages (and tools, which engines render ahead of them) of a /v1/chat/completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    parts = []
    tools = body.get("tools")
    if tools:
        parts.append(json.dumps(tools, sort_keys=True, separators=(",", ":")) + _RECORD)
    conversation_chars = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"messages[{i}] must be an object")
        parts.append(f"{message.get('role', '')}{_FIELD}{_content_text(message.get('content'))}{_RECORD}")
        if conversation_chars is None and message.get("role") == "user":
            conversation_chars = sum(len(p) for p in parts)
    return Prompt("".join(parts), conversation_chars)


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
