"""Chat templates: Jinja2 templates rendered in a sandbox, with Hugging Face's conventions.

A template sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token`
and any extra keyword (e.g. `tools`), plus the helpers HF's
`apply_chat_template` provides: `raise_exception(msg)`, `strftime_now(fmt)`
and a `tojson` filter that does not HTML-escape.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template is malformed, refused the conversation, or did something unsafe."""


# Markers that end a turn in common templates; a reply stops at the first one.
END_OF_TURN_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|END_OF_TURN_TOKEN|>",
)

_ALTERNATE = ("{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{% endif %}")

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta's Llama-2-chat format: the system prompt goes inside the first [INST] block.
_LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    + _ALTERNATE +
    "{% if loop.first and system_message is not none %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

_LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma has no system role; like Gemma 3's template, a system prompt opens the first user turn.
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    + _ALTERNATE +
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Phi-3's format (as llama.cpp's LLM_CHAT_TEMPLATE_PHI_3 writes it): <|role|>, the text, <|end|>.
_PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama2": _LLAMA2,
    "llama3": _LLAMA3,
    "gemma": _GEMMA,
    "phi3": _PHI3,
}


class _GenerationTag(Extension):
    """HF's `{% generation %}` only marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ', which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def infer_stop_strings(template: str, eos_token: str = "") -> list[str]:
    """End-of-turn markers the template writes, then the EOS text if it is not one of them."""
    stops = [marker for marker in END_OF_TURN_MARKERS if marker in template]
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    return stops


class ChatFormatter:
    """Renders a conversation into a prompt with one chat template."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "",
                 stop_strings: list[str] | None = None):
        if not isinstance(template, str) or not template:
            raise TypeError("template must be a non-empty string")
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.stop_strings = (list(stop_strings) if stop_strings is not None
                             else infer_stop_strings(template, eos_token))
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from exc

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages`; extra keywords (e.g. tools) become template variables."""
        _check_messages(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._compiled.render(**variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def __repr__(self) -> str:
        return f"ChatFormatter(stop_strings={self.stop_strings!r}, template={self.template[:40]!r}...)"


def normalize_messages(messages) -> list:
    """OpenAI-style messages as templates read them: content that is a list of
    parts becomes their text joined by newlines, None (an assistant turn
    that only calls tools) becomes "". Other keys (tool_calls, name,
    tool_call_id) pass through for templates that use them."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        content = message.get("content", "")
        if content is None or isinstance(content, (list, tuple)):
            message = {**message, "content": _content_text(content, i)}
        out.append(message)
    return out


def _content_text(parts, i: int) -> str:
    if parts is None:
        return ""
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"messages[{i}]['content'][{j}] is a {kind!r} part; kvsink_cpp runs text-only "
                             f"models (content parts must be {{'type': 'text', 'text': ...}})")
    return "\n".join(texts)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r} key")
            if not isinstance(message[key], str):
                raise TypeError(f"messages[{i}][{key!r}] must be a string, "
                                f"got {type(message[key]).__name__}")


def builtin(name: str, bos_token: str = "", eos_token: str = "") -> ChatFormatter:
    """The built-in template called `name` (see BUILTIN_TEMPLATES)."""
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown chat format {name!r}; built-in formats: {', '.join(sorted(BUILTIN_TEMPLATES))}")
    return ChatFormatter(BUILTIN_TEMPLATES[name], bos_token=bos_token, eos_token=eos_token)


def _token_text(metadata: Mapping, id_key: str) -> str:
    tokens = metadata.get("tokenizer.ggml.tokens")
    token_id = metadata.get(id_key)
    if tokens is None or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        return ""
    return tokens[token_id]


# The built-in format of architectures whose GGUFs may come without a template
# (Gemma 3 270M's does); other architectures (llama, qwen2, qwen3: Qwen's own
# format is chatml) fall back to chatml.
ARCH_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}


def arch_template_name(architecture) -> str:
    """The built-in template a GGUF of this architecture without a template gets."""
    return ARCH_TEMPLATES.get(architecture, "chatml")


def from_metadata(metadata: Mapping, name: str | None = None) -> ChatFormatter:
    """The GGUF's own chat template, or with `name` that named template (GGUF's or
    built-in); else the architecture's built-in one (ARCH_TEMPLATES), else chatml."""
    bos = _token_text(metadata, "tokenizer.ggml.bos_token_id")
    eos = _token_text(metadata, "tokenizer.ggml.eos_token_id")
    if name is None:
        template = metadata.get("tokenizer.chat_template")
        if template:
            return ChatFormatter(template, bos_token=bos, eos_token=eos)
        return builtin(arch_template_name(metadata.get("general.architecture")), bos_token=bos, eos_token=eos)
    # GGUF may carry extra named templates, e.g. tokenizer.chat_template.tool_use.
    named = metadata.get(f"tokenizer.chat_template.{name}")
    if named:
        return ChatFormatter(named, bos_token=bos, eos_token=eos)
    return builtin(name, bos_token=bos, eos_token=eos)
