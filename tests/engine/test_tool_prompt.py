"""Tools through the model's own chat template (engine.prompts, engine.tool_prompt): a template
that renders `tools` gets them, and the conversation's earlier calls and results in the shape
templates read; a template that takes none gets the Hermes prompt (tests/engine/test_structured.py)."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError
from engine.prompts import encode_prompt
from engine.request import PromptInput

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0123456789abcdef01234567",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "18 C"},
]

# Llama 3.x's shape: tools as JSON in the system turn, a call's arguments through tojson.
LLAMA_LIKE = (
    "{%- for t in tools %}{{ t | tojson }}\n{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.tool_calls %}{%- for c in m.tool_calls %}"
    '{{ \'{"name": "\' + c.function.name + \'", "parameters": \' + (c.function.arguments | tojson) + "}" }}'
    "{%- endfor %}"
    "{%- elif m.role == 'tool' %}[{{ m.name }}] {{ m.content }}"
    "{%- else %}{{ m.role }}: {{ m.content }}\n{%- endif %}{%- endfor %}"
)
# DeepSeek's shape: the arguments concatenated, so they must be text.
DEEPSEEK_LIKE = (
    "{%- if tools %}TOOLS{%- endif %}{%- for m in messages %}"
    "{%- if m.tool_calls %}{%- for c in m.tool_calls %}"
    "{{ '<｜tool▁call▁begin｜>' + c.function.name + '<｜tool▁sep｜>' + c.function.arguments + '<｜tool▁call▁end｜>' }}"
    "{%- endfor %}{%- else %}{{ m.content }}{%- endif %}{%- endfor %}"
)
# Mistral's shape: call ids of nine letters and digits, or the template refuses.
MISTRAL_LIKE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- for m in messages %}{%- if m.tool_calls %}{%- for c in m.tool_calls %}"
    "{%- if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{%- endif %}[TOOL_CALLS]{{ c.function.name }}[CALL_ID]{{ c.id }}[ARGS]{{ c.function.arguments | tojson }}"
    "{%- endfor %}{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.tool_call_id }}[TOOL_CONTENT]{{ m.content }}"
    "{%- else %}{{ m.content }}{%- endif %}{%- endfor %}"
)


def rendered(smollm, template: str, fmt: str, messages=HISTORY, tools=(WEATHER,)) -> str:
    prompt = PromptInput(messages=messages, tools=list(tools) or None)
    return smollm.tokenizer.decode(encode_prompt(smollm.tokenizer, prompt, template, tool_format=fmt))


def test_a_template_that_renders_tools_gets_them_and_the_calls_as_objects(smollm):
    text = rendered(smollm, LLAMA_LIKE, "llama3_json")
    assert '"name": "get_weather"' in text and "<tools>" not in text  # the template's, not the Hermes prompt
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text
    assert "[get_weather] 18 C" in text  # a tool result carries its call's name


def test_a_template_that_concatenates_arguments_gets_them_as_text(smollm):
    text = rendered(smollm, DEEPSEEK_LIKE, "deepseek_v3")
    assert 'get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>' in text and "TOOLS" in text


def test_mistral_templates_get_nine_character_ids_that_still_pair_calls_with_results(smollm):
    text = rendered(smollm, MISTRAL_LIKE, "mistral")
    call_id = text.split("[CALL_ID]")[1].split("[ARGS]")[0]
    assert len(call_id) == 9 and call_id.isalnum()
    assert f"[TOOL_RESULTS]{call_id}[TOOL_CONTENT]18 C" in text
    with pytest.raises(InvalidRequestError, match="length 9"):  # other formats keep our ids
        rendered(smollm, MISTRAL_LIKE, "hermes")


def test_a_template_without_tools_gets_the_hermes_prompt(smollm):
    text = rendered(smollm, "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{%- endfor %}", "hermes")
    assert "<tools>" in text and '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
