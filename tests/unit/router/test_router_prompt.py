"""The canonical prompt text the router hashes: a chat that grows keeps its earlier text as a prefix."""

from __future__ import annotations

import pytest

from kiln_router.prompt import PromptError, chat_prompt, completion_prompt


def test_a_longer_chat_starts_with_the_shorter_chats_text() -> None:
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert chat_prompt({"messages": turn2}).text.startswith(chat_prompt({"messages": turn1}).text)


def test_a_conversation_keeps_its_text_through_the_first_user_message_in_every_turn() -> None:
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    turn3 = [*turn1, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And?"}]
    first, third = chat_prompt({"messages": turn1}), chat_prompt({"messages": turn3})
    assert first.conversation_chars == len(first.text)  # the whole first turn
    assert third.conversation_chars == first.conversation_chars
    assert third.text[: third.conversation_chars] == first.text
    assert chat_prompt({"messages": [{"role": "system", "content": "s"}]}).conversation_chars is None


def test_message_boundaries_and_parts_are_part_of_the_text() -> None:
    joined = chat_prompt({"messages": [{"role": "user", "content": "ab"}]}).text
    split = chat_prompt(
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    ).text
    assert joined != split
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert chat_prompt({"messages": [{"role": "user", "content": parts}]}).text == joined


def test_tools_come_first_as_engines_render_them() -> None:
    messages = [{"role": "user", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    with_tools = chat_prompt({"messages": messages, "tools": tools}).text
    assert with_tools.endswith(chat_prompt({"messages": messages}).text)
    assert with_tools != chat_prompt({"messages": messages}).text


def test_completion_prompts_of_every_shape() -> None:
    assert completion_prompt({"prompt": "abc"}).text == "abc"
    assert completion_prompt({"prompt": [1, 2, 3]}).text.startswith(
        completion_prompt({"prompt": [1, 2]}).text
    )
    assert completion_prompt({"prompt": ["a", "b"]}).text != completion_prompt({"prompt": ["ab"]}).text
    assert completion_prompt({"prompt": "abc"}).conversation_chars is None


@pytest.mark.parametrize(
    ("render", "body"),
    [
        (completion_prompt, {}),
        (completion_prompt, {"prompt": []}),
        (chat_prompt, {"messages": []}),
        (chat_prompt, {"messages": ["hi"]}),
    ],
)
def test_a_body_without_a_prompt_is_refused(render, body) -> None:
    with pytest.raises(PromptError):
        render(body)
