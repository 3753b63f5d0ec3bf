"""LoRA adapters as a user declares them, on the real node: examples/tiny-cpu-lora.yaml (tiny-chat and
two adapters in the `kiln-models` claim) served by the engine image in containerd. The OpenAI client
picks the base model or an adapter by `model`; changing spec.engine.lora reaches the running pod
through the ConfigMap it mounts: the same pod, never restarted, serves the new list.
The base engine is the one test_tiny_chat's deployment uses (adapters are not part of its key).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kiln.demo import manifests
from kiln.demo.kube import Kubectl
from kiln.demo.stack import Stack, repo_root
from kiln.demo.story import Story, serving_example

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]
openai = pytest.importorskip("openai")

EXAMPLE = repo_root() / "examples" / "tiny-cpu-lora.yaml"
NAME = "tiny-chat-lora"
BASE = "tiny-chat"
PROMPT = manifests.chat_prompt("What does Kiln build?")
# The kubelet refreshes a mounted ConfigMap within its sync period (a minute) plus its cache's TTL;
# the engine then looks at the file every 5 s.
PROPAGATION_S = 180.0


@pytest.fixture(scope="module")
def story(kiln_stack: Stack) -> Iterator[Story]:
    with serving_example(kiln_stack, EXAMPLE) as story:
        yield story


def client_of(story: Story) -> Any:
    [endpoint] = story.ready_pod_endpoints()
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=60.0)


def answer(client: Any, model: str) -> str:
    done = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert done.model == (BASE if model == "base" else model)  # a response names what ran
    return str(done.choices[0].text)


def serving_pods(story: Story) -> dict[str, int]:
    """Name -> restart count of the engine container, for each serving pod."""
    return {
        pod["metadata"]["name"]: sum(
            c.get("restartCount", 0) for c in pod["status"].get("containerStatuses", [])
        )
        for pod in story.pods()
        if not pod["metadata"].get("deletionTimestamp")
    }


def test_the_openai_client_selects_the_base_model_or_an_adapter(story: Story) -> None:
    client = client_of(story)
    assert {m.id for m in client.models.list().data} == {BASE, "lora-a", "lora-b"}
    texts = {model: answer(client, model) for model in (BASE, "lora-a", "lora-b")}
    assert len(set(texts.values())) == 3, texts  # each adapter changes what the model says
    assert answer(client, "base") == texts[BASE]


def test_a_changed_adapter_list_reaches_the_running_pod_without_a_restart(
    story: Story, kubectl: Kubectl
) -> None:
    client = client_of(story)
    before = serving_pods(story)
    b_text = answer(client, "lora-b")
    changed = [
        {"name": "lora-a", "source": "pvc://kiln-models/tiny-chat-lora/lora-a"},
        {"name": "lora-b-v2", "source": "pvc://kiln-models/tiny-chat-lora/lora-b"},
    ]
    patch = json.dumps({"spec": {"engine": {"lora": changed}}})
    kubectl("patch", "llmdeployment", NAME, "--type=merge", "-p", patch)
    started = time.monotonic()
    wanted = {BASE, "lora-a", "lora-b-v2"}
    while (served := {m.id for m in client.models.list().data}) != wanted:
        assert time.monotonic() - started < PROPAGATION_S, f"still serving {sorted(served)}"
        time.sleep(2.0)
    print(f"the running pod served the new adapter list {time.monotonic() - started:.0f} s after the patch")
    assert answer(client, "lora-b-v2") == b_text  # the same weights under their new name
    with pytest.raises(openai.BadRequestError) as refused:
        answer(client, "lora-b")
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "model"
    assert serving_pods(story) == before  # same pods, no container restarted
