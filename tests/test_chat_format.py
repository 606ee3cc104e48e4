"""Chat templates: SmolLM2's own, the built-ins, HF's helpers, the sandbox and input checks."""
import json

import pytest
from jinja2.exceptions import SecurityError

from kvsink_cpp.chat_format import (BUILTIN_TEMPLATES, ChatFormatter, ChatTemplateError, builtin,
                                    from_metadata)

TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]
NO_SYSTEM = TWO_TURNS[1:]


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path):
    from kvsink_cpp.gguf_file import GGUFFile
    with GGUFFile(smollm2_path) as gguf:
        return dict(gguf.metadata)


# --- SmolLM2's own template ------------------------------------------------------

def test_smollm2_template_renders_chatml(smollm2_metadata):
    formatter = ChatFormatter(smollm2_metadata["tokenizer.chat_template"])
    assert formatter.render(TWO_TURNS, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_injects_its_system_prompt(smollm2_metadata):
    formatter = ChatFormatter(smollm2_metadata["tokenizer.chat_template"])
    assert formatter.render(NO_SYSTEM, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_from_metadata_uses_smollm2_template_and_tokens(smollm2_metadata):
    formatter = from_metadata(smollm2_metadata)
    assert formatter.template == smollm2_metadata["tokenizer.chat_template"]
    assert (formatter.bos_token, formatter.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert formatter.stop_strings == ["<|im_end|>"]


# --- built-in templates -------------------------------------------------------------

def test_builtin_chatml():
    formatter = builtin("chatml")
    assert formatter.render(TWO_TURNS) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert formatter.stop_strings == ["<|im_end|>"]


def test_builtin_llama2():
    formatter = builtin("llama2", bos_token="<s>", eos_token="</s>")
    assert formatter.render(TWO_TURNS) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s>"
        "<s>[INST] What is 2+2? [/INST]"
    )
    assert formatter.stop_strings == ["</s>"]


def test_builtin_llama2_without_system():
    formatter = builtin("llama2", bos_token="<s>", eos_token="</s>")
    assert formatter.render(NO_SYSTEM) == "<s>[INST] Hi! [/INST] Hello. </s><s>[INST] What is 2+2? [/INST]"


def test_builtin_llama3():
    formatter = builtin("llama3", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert formatter.render(TWO_TURNS) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert formatter.stop_strings == ["<|eot_id|>", "<|end_of_text|>"]


def test_builtin_gemma_folds_the_system_prompt_into_the_first_user_turn():
    formatter = builtin("gemma", bos_token="<bos>", eos_token="<eos>")
    assert formatter.render(TWO_TURNS) == (
        "<bos>"
        "<start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert formatter.stop_strings == ["<end_of_turn>", "<eos>"]


def test_builtin_names():
    assert set(BUILTIN_TEMPLATES) == {"chatml", "llama2", "llama3", "gemma", "phi3"}


@pytest.mark.parametrize("name", ["llama2", "gemma"])
def test_builtins_refuse_roles_out_of_order(name):
    with pytest.raises(ChatTemplateError, match="alternate"):
        builtin(name).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_unknown_builtin_lists_the_names():
    with pytest.raises(ValueError, match="chatml, gemma, llama2, llama3, phi3"):
        builtin("vicuna")


# --- from_metadata without a file ---------------------------------------------------
TOKENS = ["<unk>", "<s>", "</s>"]


def test_from_metadata_token_strings_and_own_template():
    metadata = {"tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
                "tokenizer.ggml.tokens": TOKENS,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert from_metadata(metadata).render(NO_SYSTEM[:1]) == "<s>Hi!</s>"


def test_from_metadata_name_picks_a_builtin_over_the_file_template():
    metadata = {"tokenizer.chat_template": "{{ 'own' }}", "tokenizer.ggml.tokens": TOKENS,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert from_metadata(metadata, "llama2").render(NO_SYSTEM[:1]) == "<s>[INST] Hi! [/INST]"


def test_from_metadata_name_picks_a_named_gguf_template():
    metadata = {"tokenizer.chat_template": "{{ 'own' }}", "tokenizer.chat_template.tool_use": "{{ 'tools' }}"}
    assert from_metadata(metadata, "tool_use").render([]) == "tools"


def test_from_metadata_falls_back_to_chatml():
    assert from_metadata({}).render([]) == "<|im_start|>assistant\n"


def test_from_metadata_unknown_name():
    with pytest.raises(ValueError, match="unknown chat format 'nope'"):
        from_metadata({}, "nope")


# --- helpers: raise_exception, tojson, strftime_now, extra variables ------------------

def test_raise_exception_surfaces_with_its_message():
    formatter = ChatFormatter("{{ raise_exception('only user turns, please') }}")
    with pytest.raises(ChatTemplateError, match="only user turns, please"):
        formatter.render(NO_SYSTEM)


def test_tojson_does_not_escape_like_hf():
    formatter = ChatFormatter("{{ tools | tojson }}")
    tools = [{"name": "sum", "description": "a <b> & 'c' é"}]
    assert formatter.render([], tools=tools) == '[{"name": "sum", "description": "a <b> & \'c\' é"}]'


def test_tojson_indent():
    assert ChatFormatter("{{ x | tojson(indent=2) }}").render([], x={"a": [1]}) == json.dumps({"a": [1]}, indent=2)


def test_strftime_now_is_available():
    year = ChatFormatter("{{ strftime_now('%Y') }}").render([])
    assert len(year) == 4 and year.isdigit()


def test_loop_controls_are_enabled():
    formatter = ChatFormatter("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                              "{{ m['content'] }}{% endfor %}")
    assert formatter.render(NO_SYSTEM) == "Hi!"


def test_generation_tag_keeps_its_body():
    formatter = ChatFormatter("{% generation %}{{ messages[0]['content'] }}{% endgeneration %}")
    assert formatter.render(NO_SYSTEM) == "Hi!"


def test_add_generation_prompt_false():
    assert builtin("chatml").render(NO_SYSTEM[:1], add_generation_prompt=False) == "<|im_start|>user\nHi!<|im_end|>\n"


# --- stop strings ----------------------------------------------------------------------

def test_stop_strings_given_explicitly_win():
    assert ChatFormatter("{{ '<|im_end|>' }}", stop_strings=["###"]).stop_strings == ["###"]


def test_stop_strings_fall_back_to_eos():
    assert ChatFormatter("{{ messages }}", eos_token="</s>").stop_strings == ["</s>"]
    assert ChatFormatter("{{ messages }}").stop_strings == []


# --- sandbox -----------------------------------------------------------------------------

def test_sandbox_renders_a_dunder_attribute_as_nothing():
    # The sandbox turns an unsafe attribute into an undefined value, which prints as ''.
    assert ChatFormatter("[{{ ''.__class__ }}]").render([]) == "[]"


def test_sandbox_blocks_reaching_through_a_dunder_attribute():
    with pytest.raises(ChatTemplateError, match="unsafe") as caught:
        ChatFormatter("{{ ''.__class__.__mro__ }}").render([])
    assert isinstance(caught.value.__cause__, SecurityError)


def test_sandbox_blocks_mutating_messages():
    messages = [{"role": "user", "content": "Hi!"}]
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatFormatter("{{ messages.append(1) }}").render(messages)
    assert messages == [{"role": "user", "content": "Hi!"}]


def test_syntax_error_is_a_chat_template_error():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatFormatter("{% for %}")


# --- message validation -------------------------------------------------------------------

@pytest.mark.parametrize("messages, error, text", [
    ("hello", TypeError, "messages must be a list"),
    (["hello"], TypeError, r"messages\[0\] must be a dict"),
    ([{"content": "x"}], ValueError, r"messages\[0\] has no 'role'"),
    ([{"role": "user"}], ValueError, r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": "a"}, {"role": 1, "content": "b"}], TypeError, r"messages\[1\]\['role'\] must be a string"),
    ([{"role": "user", "content": None}], TypeError, r"messages\[0\]\['content'\] must be a string"),
])
def test_bad_messages_are_refused_before_rendering(messages, error, text):
    with pytest.raises(error, match=text):
        builtin("chatml").render(messages)
