"""Chat formatting, one implementation for training (`CausalLMTask`), `peftlab generate` and
`peftlab serve`, so that what an adapter is trained on is what it is served.

With a chat template (the tokenizer's `chat_template`): a prompt is the user turn followed by the
template's assistant header (`prompt_ids`), exactly the first tokens of the training example of a
prompt → response row (`chat_example`). A training example is the template's rendering of the
whole conversation; the loss covers the assistant turns only: each turn's content and its
end-of-turn token (the tokenizer's eos, what stops generation), not the header before it nor the
separator after. The turns are found by rendering the conversation incrementally and comparing
token prefixes, which works for any template that renders a conversation as the concatenation of
its turns (ChatML, Llama 3, ...); templates that rewrite earlier turns (e.g. dropping reasoning)
are refused rather than trained on the wrong tokens. (`return_assistant_tokens_mask` would need a
`{% generation %}` block, which most templates lack.)

Without a template: the plain format `prompt + "\\n"`, then the response and eos; multi-turn
conversations have no plain format and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core.errors import DataError

IGNORE = -100                       # label value the loss skips (transformers' convention)
PLAIN_SEPARATOR = "\n"              # between prompt and response without a chat template

Message = Mapping[str, str]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: Sequence[Message], generation: bool) -> list[int]:
    """Token ids of `messages` rendered by the chat template (and the assistant header when
    `generation`). A template's own refusal (e.g. "roles must alternate") becomes a DataError."""
    try:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation,
                                            tokenize=True, return_dict=False)
    except Exception as e:     # jinja2's TemplateError and whatever a template raises
        if type(e).__module__.split(".")[0] != "jinja2":
            raise
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"the tokenizer's chat template refuses the conversation [{roles}]: {e}") from e
    return list(ids)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids a model reads before answering `prompt`: the chat template's user turn and
    assistant header, or without a template `prompt + "\\n"` (no special tokens), exactly as a
    prompt → response training example starts."""
    if has_chat_template(tokenizer):
        return _render(tokenizer, [{"role": "user", "content": prompt}], True)
    return tokenizer.encode(prompt + PLAIN_SEPARATOR, add_special_tokens=False)


def conversation_prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The token ids a model reads before its next assistant turn in `messages`: the chat
    template's rendering with the assistant header (`add_generation_prompt`), or without a
    template the plain format of a lone user turn (`prompt_ids`); other conversations have no
    plain format and are refused, as in training."""
    if has_chat_template(tokenizer):
        return _render(tokenizer, messages, True)
    if [m["role"] for m in messages] != ["user"]:
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"the conversation [{roles}] needs a tokenizer with a chat template, and this "
                        "one has none: send one user message (formatted as prompt + newline), or "
                        "set the tokenizer's chat_template")
    return prompt_ids(tokenizer, messages[0]["content"])


def row_messages(row: Mapping[str, Any]) -> list[Message]:
    """A chat row's conversation: `messages` as given, or a prompt → response row as one user
    turn and one assistant turn."""
    if "messages" in row:
        return list(row["messages"])
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def chat_example(tokenizer: Any, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a chat row; labels are the ids on the assistant turns (see the
    module docstring) and IGNORE elsewhere."""
    messages = row_messages(row)
    if has_chat_template(tokenizer):
        return _templated(tokenizer, messages)
    if "messages" in row and [m["role"] for m in messages] != ["user", "assistant"]:
        raise DataError("a multi-turn (or system) conversation needs a tokenizer with a chat "
                        "template, and this one has none: set tokenizer.chat_template, or give "
                        "single-turn prompt,response rows (trained as prompt + newline + response)")
    prompt = prompt_ids(tokenizer, messages[0]["content"])
    answer = tokenizer.encode(messages[1]["content"], add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return prompt + answer, [IGNORE] * len(prompt) + answer


def _templated(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    ids = _render(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    stop = tokenizer.eos_token_id
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:k], True)         # up to the assistant header
        end = _render(tokenizer, messages[:k + 1], False)       # through this turn
        if not (len(start) < len(end) <= len(ids) and end[:len(start)] == start
                and ids[:len(end)] == end):
            raise DataError(
                f"the tokenizer's chat template does not render assistant turn {k} as a "
                "continuation of the conversation before it (it rewrites earlier turns), so its "
                "tokens cannot be told apart for the loss; use prompt,response rows or a template "
                "that renders turns in sequence")
        span = range(len(start), len(end))
        # the turn's content and its eos; the template's separator after the eos is not answered
        last = max((i for i in span if ids[i] == stop), default=span[-1])
        labels[span[0]:last + 1] = ids[span[0]:last + 1]
    return ids, labels
