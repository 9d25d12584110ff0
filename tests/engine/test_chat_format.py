"""How a model thinks, read from its chat template (engine.chat_format): the families' templates,
cut down to the parts that decide it, and the mapping of reasoning_effort / thinking onto them."""

from __future__ import annotations

import pytest

from engine.chat_format import (
    check_template_kwargs,
    detect_reasoning_format,
    merged_template_kwargs,
    prompt_opens_reasoning,
    template_variables,
    thinking_variables,
)
from engine.errors import InvalidRequestError

# The parts of each family's template that matter here (generation prompt, thinking switch).
QWEN3 = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
QWQ = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
R1_DISTILL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% endif %}{% if m['role'] == 'assistant' and '</think>' in m['content'] %}"
    "{% set content = m['content'].split('</think>')[-1] %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
DEEPSEEK_V31 = (
    "{% if add_generation_prompt %}{% if thinking is defined and thinking %}{{ '<｜Assistant｜><think>' }}"
    "{% else %}{{ '<｜Assistant｜></think>' }}{% endif %}{% endif %}"
)
SMOLLM3 = (
    "{%- if enable_thinking is not defined -%}{%- set enable_thinking = true -%}{%- endif -%}"
    '{%- if enable_thinking -%}{%- set reasoning_mode = "/think" -%}{%- else -%}'
    '{%- set reasoning_mode = "/no_think" -%}{%- endif -%}'
    '{%- if messages[0].role == "system" and "/no_think" in messages[0].content -%}'
    '{%- set reasoning_mode = "/no_think" -%}{%- endif -%}'
    '{%- if add_generation_prompt -%}{%- if reasoning_mode == "/think" -%}{{ "<|im_start|>assistant\\n" }}'
    '{%- else -%}{{ "<|im_start|>assistant\\n" + "<think>\\n\\n</think>\\n" }}{%- endif -%}{%- endif -%}'
)
GRANITE = (
    "{%- if thinking %}{%- set system_message = 'You are a helpful AI assistant. Write your thoughts "
    "between <think></think> and write your response between <response></response>.' %}{%- endif %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
MAGISTRAL = (
    "{%- set default_system_message = 'First draft your thinking process until you arrive at a response. "
    "Your thinking process must follow the template below:[THINK]Your thoughts[/THINK]Here, provide an "
    "answer.' %}{{- bos_token }}{%- for message in messages %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- endfor %}"
)
GPT_OSS = (
    "{%- if not reasoning_effort is defined %}{%- set reasoning_effort = 'medium' %}{%- endif %}"
    "{{- '<|start|>system<|message|>Reasoning: ' + reasoning_effort + '<|end|>' }}"
    "{%- if add_generation_prompt %}<|start|>assistant{%- endif %}"
    "{#- analysis goes in <|channel|>analysis, calls in <|channel|>commentary #}<|channel|>"
)
SMOLLM2 = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template,expected",
    [
        (QWEN3, "think"),
        (QWQ, "think"),
        (R1_DISTILL, "think"),
        (DEEPSEEK_V31, "think"),
        (SMOLLM3, "think"),
        (GRANITE, "think"),
        (MAGISTRAL, "mistral"),
        (GPT_OSS, "harmony"),
        (SMOLLM2, None),
    ],
)
def test_each_family_s_reasoning_format_is_read_from_its_template(template, expected):
    assert detect_reasoning_format(template) == expected


@pytest.mark.parametrize(
    "tail,opens",
    [
        ("<|im_start|>assistant\n<think>\n", True),  # QwQ
        ("<｜Assistant｜><think>\n", True),  # R1 distills
        ("<|im_start|>assistant\n", False),  # Qwen3 thinking: the model opens it itself
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # Qwen3 enable_thinking false
        ("<think>old</think>x<｜Assistant｜></think>", False),  # DeepSeek V3.1 thinking off
        ("<think> not only whitespace after it", False),
    ],
)
def test_a_prompt_opens_the_block_only_when_it_ends_inside_one(tail, opens):
    assert prompt_opens_reasoning(tail, "think") is opens


def test_the_switch_each_template_reads_is_found():
    assert "enable_thinking" in template_variables(QWEN3)
    assert "enable_thinking" in template_variables(SMOLLM3)
    assert "thinking" in template_variables(GRANITE) and "thinking" in template_variables(DEEPSEEK_V31)
    assert "reasoning_effort" in template_variables(GPT_OSS)
    assert not {"enable_thinking", "thinking", "reasoning_effort"} & template_variables(QWQ)


@pytest.mark.parametrize(
    "template,effort,expected",
    [
        (QWEN3, "none", {"enable_thinking": False}),
        (QWEN3, "minimal", {"enable_thinking": False}),
        (QWEN3, "high", {"enable_thinking": True}),
        (SMOLLM3, "low", {"enable_thinking": True}),
        (GRANITE, "medium", {"thinking": True}),
        (DEEPSEEK_V31, "none", {"thinking": False}),
        (GPT_OSS, "low", {"reasoning_effort": "low"}),
        (GPT_OSS, "high", {"reasoning_effort": "high"}),
        (QWQ, "high", {}),  # always thinks: on is what it does
        (SMOLLM2, "none", {}),  # never thinks: off is what it does
    ],
)
def test_reasoning_effort_maps_onto_what_the_template_reads(template, effort, expected):
    reads = template_variables(template)
    assert thinking_variables(reads, detect_reasoning_format(template), effort=effort) == expected


@pytest.mark.parametrize(
    "template,effort,words",
    [
        (GPT_OSS, "none", "low, medium or high"),
        (QWQ, "minimal", "always thinks"),
        (SMOLLM2, "high", "does not think"),
    ],
)
def test_reasoning_effort_a_template_cannot_honour_is_refused_by_name(template, effort, words):
    reads = template_variables(template)
    with pytest.raises(InvalidRequestError, match=words) as err:
        thinking_variables(reads, detect_reasoning_format(template), effort=effort)
    assert err.value.param == "reasoning_effort"


def test_anthropic_thinking_on_or_off_maps_the_same_way_and_names_its_own_field():
    assert thinking_variables(template_variables(QWEN3), "think", thinking=False) == {"enable_thinking": False}
    assert thinking_variables(template_variables(GPT_OSS), "harmony", thinking=True) == {}
    with pytest.raises(InvalidRequestError) as err:
        thinking_variables(template_variables(SMOLLM2), None, thinking=True)
    assert err.value.param == "thinking"
    assert thinking_variables(template_variables(SMOLLM2), None) == {}


def test_template_kwargs_must_be_variables_the_template_reads():
    reads = template_variables(QWEN3)
    check_template_kwargs({"enable_thinking": False}, reads, "chat_template_kwargs")
    with pytest.raises(InvalidRequestError, match="does not read 'thinking_budget'") as err:
        check_template_kwargs({"thinking_budget": 5}, reads, "chat_template_kwargs")
    assert err.value.param == "chat_template_kwargs.thinking_budget"
    with pytest.raises(InvalidRequestError, match="chat template call itself"):
        check_template_kwargs({"add_generation_prompt": False}, reads, "chat_template_kwargs")


def test_a_request_s_kwargs_override_the_model_s_and_must_agree_with_its_effort():
    model = {"enable_thinking": False, "x": 1}
    assert merged_template_kwargs(model, {"x": 2}, {"enable_thinking": True}, "reasoning_effort") == {
        "enable_thinking": True,
        "x": 2,
    }
    with pytest.raises(InvalidRequestError) as err:
        merged_template_kwargs({}, {"enable_thinking": True}, {"enable_thinking": False}, "reasoning_effort")
    assert err.value.param == "reasoning_effort"


@pytest.mark.parametrize(
    "template,variables,system,opens",
    [
        (QWEN3, {}, None, False),  # Qwen3 thinks by default and writes <think> itself
        (QWEN3, {"enable_thinking": False}, None, False),  # the empty block is closed in the prompt
        (QWQ, {}, None, True),
        (R1_DISTILL, {}, None, True),
        (DEEPSEEK_V31, {"thinking": True}, None, True),
        (DEEPSEEK_V31, {"thinking": False}, None, False),
        (SMOLLM3, {}, None, False),
        (SMOLLM3, {}, "Be brief. /no_think", False),
        (SMOLLM3, {"enable_thinking": False}, None, False),
    ],
)
def test_each_template_s_rendered_prompt_says_whether_the_answer_starts_inside_the_block(
    template, variables, system, opens
):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "2+2?"}]
    env = ImmutableSandboxedEnvironment()
    prompt = env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="", **variables)
    assert prompt_opens_reasoning(prompt[-40:], detect_reasoning_format(template)) is opens
