"""Speculative decoding as a user declares it, on the real node: examples/tiny-cpu-speculative-
draft.yaml (tiny-chat, drafted by tiny-chat from the `kiln-models` claim) and examples/tiny-cpu-
speculative-eagle.yaml (tiny-chat with the EAGLE head trained for it). The build Job fetches the
draft or head into the engine, the serving pod speculates with it, greedy answers over the OpenAI
API equal the model's own greedy tokens computed here without speculation, and the pod's metrics
count the proposed and accepted drafts.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from kiln.demo import manifests
from kiln.demo.stack import Stack, repo_root
from kiln.demo.story import Story, serving_example

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engine]
openai = pytest.importorskip("openai")

# (example, served name, least share of drafts kept): tiny-chat drafting for itself keeps nearly
# all; the head keeps many on these prompts (its engine test holds it to half on its training
# questions), and any at all shows its features reach it in the pod.
CASES = {
    "draft": ("tiny-cpu-speculative-draft.yaml", "tiny-chat-draft", 0.9),
    "eagle": ("tiny-cpu-speculative-eagle.yaml", "tiny-chat-eagle", 0.0),
}
PROMPTS = [manifests.chat_prompt("What does Kiln build?"), manifests.chat_prompt("Name a GPU.")]
MAX_TOKENS = 24


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def story(kiln_stack: Stack, case: str) -> Iterator[Story]:
    with serving_example(kiln_stack, repo_root() / "examples" / CASES[case][0]) as story:
        yield story


def plain_greedy_texts() -> list[str]:
    """The model's greedy completions without speculation, computed in this process."""
    from kiln_engine.config import EngineConfig
    from kiln_engine.engine import LLMEngine
    from kiln_engine.interface import SamplingParams

    engine = LLMEngine(repo_root() / "examples" / "tiny-chat", EngineConfig(device="cpu", max_model_len=512))
    assert engine.tokenizer is not None
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = engine.generate([engine.tokenizer.encode(p) for p in PROMPTS], params)
    return [engine.tokenizer.decode(tokens) for tokens in outputs]


def metric(endpoint: str, name: str) -> float:
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


def test_greedy_answers_equal_the_models_own_and_drafts_are_kept(story: Story, case: str) -> None:
    _, model, least_kept = CASES[case]
    [endpoint] = story.ready_pod_endpoints()
    client: Any = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=60.0)
    answers = [
        client.completions.create(
            model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in PROMPTS
    ]
    assert answers == plain_greedy_texts()
    proposed = metric(endpoint, "kiln_engine_spec_decode_proposed_tokens_total")
    accepted = metric(endpoint, "kiln_engine_spec_decode_accepted_tokens_total")
    assert proposed > 0 and accepted > 0 and accepted >= least_kept * proposed, (proposed, accepted)
