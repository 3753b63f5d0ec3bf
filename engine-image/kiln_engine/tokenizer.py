"""Text <-> token ids for a checkpoint: `tokenizer.json` via `tokenizers`, chat templates via jinja2.

Reads what Hugging Face writes next to a model: tokenizer.json (vocabulary, pre/post-processing,
special tokens), tokenizer_config.json (bos/eos tokens, chat template), chat_template.jinja or
chat_template.json (newer layouts), generation_config.json (eos ids). The chat template renders
with the same sandbox and helpers as transformers' `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return str(value.get("content"))
    return str(value)


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template, and the ids that end generation."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        config: dict[str, Any] | None = None,
        chat_template: str | dict[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.tk = tokenizer
        self.config = config or {}
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self.unk_token = _token_str(self.config.get("unk_token"))
        self.templates: dict[str, str] = {}
        if isinstance(chat_template, str):
            self.templates["default"] = chat_template
        elif isinstance(chat_template, dict):
            self.templates.update(chat_template)
        self._compiled: dict[str, jinja2.Template] = {}
        ids = list(eos_token_ids)
        if self.eos_token is not None and (eid := self.tk.token_to_id(self.eos_token)) is not None:
            ids.append(eid)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        self.bos_token_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None

    @classmethod
    def from_dir(cls, path: str | Path, extra_eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        d = Path(path)
        if not (d / "tokenizer.json").exists():
            raise FileNotFoundError(f"{d} has no tokenizer.json (only fast tokenizers are supported)")
        tk = HFTokenizer.from_file(str(d / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (d / "tokenizer_config.json").exists():
            config = json.loads((d / "tokenizer_config.json").read_text())
        if (d / "special_tokens_map.json").exists():
            for key, value in json.loads((d / "special_tokens_map.json").read_text()).items():
                config.setdefault(key, value)
        template: str | dict[str, str] | None = None
        raw = config.get("chat_template")
        if isinstance(raw, list):  # [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in raw}
        elif isinstance(raw, str):
            template = raw
        if (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text()
        elif (d / "chat_template.json").exists():
            template = json.loads((d / "chat_template.json").read_text()).get("chat_template", template)
        eos: list[int] = list(extra_eos_token_ids)
        if (d / "generation_config.json").exists():
            gen_eos = json.loads((d / "generation_config.json").read_text()).get("eos_token_id")
            if isinstance(gen_eos, list):
                eos.extend(int(e) for e in gen_eos)
            elif gen_eos is not None:
                eos.append(int(gen_eos))
        return cls(tk, config, template, eos)

    @property
    def vocab_size(self) -> int:
        return int(self.tk.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return bool(self.templates)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode holds it): a megabyte prompt tokenized in a server
        # thread would otherwise stall the event loop, /health included, for seconds.
        return list(self.tk.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation as transformers' `apply_chat_template(..., tokenize=False)` does."""
        if not self.templates:
            raise ValueError("this model's tokenizer has no chat template")
        name = template_name or ("tool_use" if tools and "tool_use" in self.templates else "default")
        if name not in self.templates:
            name = next(iter(self.templates))
        if name not in self._compiled:
            self._compiled[name] = _compile_template(self.templates[name])
        special = {
            k: _token_str(v)
            for k, v in self.config.items()
            if k.endswith("_token") and isinstance(v, str | dict)
        }
        return self._compiled[name].render(
            **special,
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Chat prompt token ids; special tokens come from the template, not added again."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas, never splitting a multi-byte character.

    tokenizers' own DecodeStream (as vLLM uses it), started on a few prompt tokens of context so
    the first token's leading space comes out as a whole decode would give it; text that ends in
    U+FFFD waits for the next token. One call per token: the batched decode it replaces woke
    tokenizers' thread pool every engine step, which cost more than the decoding (bench/detokenize.py).
    """

    CONTEXT = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        # Imported here: the TensorRT-LLM image keeps the tokenizers its transformers pins (older
        # than DecodeStream's `ids`) and never detokenizes in Kiln's process.
        from tokenizers.decoders import DecodeStream

        context = list(prompt_ids[-self.CONTEXT :])
        self._stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly empty)."""
        delta = self._stream.step(self.tokenizer.tk, token_id) or ""
        self.text += delta
        return delta
