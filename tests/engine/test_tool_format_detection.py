"""The tool-call format read from a chat template (engine.chat_format.detect_tool_format), on the
lines of real templates that spell each family's call syntax."""

from __future__ import annotations

import pytest

from engine.chat_format import detect_tool_format, takes_tools

TOOLS_LOOP = "{%- if tools %}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{%- endif %}"

SNIPPETS = {
    # Qwen2.5 / Qwen3
    "hermes": (
        '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
        'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
        '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
    ),
    # Llama 3.1 / 3.3 (built-in tools) and Llama 3.2 (custom tools only)
    "llama3_json": (
        '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name '
        'and its value}.\' }}{{- "Do not use variables.\\n\\n" }}'
        '{{- "<|python_tag|>" + tool_call.name + ".call(" }}'
    ),
    # Mistral Small 3.2 / Magistral (v11)
    "mistral": (
        "{%- if tools is not none %}[AVAILABLE_TOOLS]{{- tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
        "{%- for tool_call in message.tool_calls %}[TOOL_CALLS]{{- tool_call.function.name }}[ARGS]"
        "{{- tool_call.function.arguments|tojson }}{%- endfor %}"
    ),
    # Qwen3-Coder
    "qwen3_coder": (
        "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}"
        "{{- '<parameter=' + args_name + '>\\n' }}{{- '</parameter>\\n' }}{{- '</function>\\n</tool_call>' }}"
    ),
    # LFM2
    "pythonic": (
        '{%- set system_prompt = system_prompt + "List of tools: <|tool_list_start|>[" %}'
        '{{- "<|tool_call_start|>" + tool_calls_text + "<|tool_call_end|>" }}'
    ),
    # DeepSeek R1-0528
    "deepseek_v3": (
        "{%- if tools is defined and tools is not none %}{% set tool_ns.text = tool_ns.text + "
        "'\\n\\n## Tools\\n\\nYou have access to the following tools:\\n' %}{% endif %}"
        "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' "
        "+ tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}"
    ),
    # GPT-OSS
    "harmony": (
        '{{- "<|start|>assistant to=" }}{{- "functions." + tool_call.name + "<|channel|>commentary " }}'
        '{{- (tool_call.content_type if tool_call.content_type is defined else "json") + "<|message|>" }}'
        '{{- tool_call.arguments|tojson }}{{- "<|call|>" }}'
    ),
}


@pytest.mark.parametrize("fmt", sorted(SNIPPETS))
def test_each_family_is_read_from_its_templates_call_syntax(fmt):
    assert detect_tool_format(TOOLS_LOOP + SNIPPETS[fmt]) == fmt


def test_llama_32_without_the_python_tag_and_llama_4s_pythonic_template():
    llama32 = '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}'
    assert detect_tool_format(TOOLS_LOOP + llama32) == "llama3_json"
    llama4 = (
        "{{- 'you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), "
        "func_name2(params)]' }}{{- '<|python_start|>' }}"
    )
    assert detect_tool_format(TOOLS_LOOP + llama4) == "pythonic"


def test_a_template_that_takes_no_tools_gets_hermes_whatever_it_shows(smollm):
    """Its model is prompted with the Hermes system prompt, so its calls are Hermes calls."""
    v31 = "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>'}}"
    assert not takes_tools(v31) and detect_tool_format(v31) == "hermes"
    assert not takes_tools(smollm.tokenizer.chat_template)
    assert detect_tool_format(smollm.tokenizer.chat_template) == "hermes"
    assert detect_tool_format("") == "hermes"
