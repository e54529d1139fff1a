"""Chat rendering, in one place: every stage, prepare's length check and the evaluation render a
conversation through these functions, so the length prepare checks is the length a stage feeds the model.

A prompt is a string (one user turn) or a list of {role, content} messages ending with a user turn
(refinery/data/formats.py); the answer is the assistant turn that follows it.
"""
from __future__ import annotations

from refinery.data.packing import IGNORE
from refinery.errors import UserError

Prompt = str | list[dict]


def as_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt followed by the assistant header: what generation starts from."""
    return chat_ids(tokenizer, as_messages(prompt), add_generation_prompt=True)


def conversation_ids(tokenizer, prompt: Prompt, answer: str) -> list[int]:
    """The prompt and the assistant's answer with its end-of-turn token."""
    return chat_ids(tokenizer, as_messages(prompt) + [{"role": "assistant", "content": answer}])


def render_example(tokenizer, prompt: Prompt, response: str, all_turns: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the chat-rendered conversation with the loss on the assistant's turns (each
    turn's text and its end-of-turn token); everything else (system, user turns, assistant headers) is
    masked with -100. `all_turns=False` learns only the final answer. A turn is located by rendering the
    conversation up to it, so the template must render a conversation's prefix as a prefix of its tokens."""
    conv = as_messages(prompt) + [{"role": "assistant", "content": response}]
    full = chat_ids(tokenizer, conv)
    labels = [IGNORE] * len(full)
    turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    for i in (turns if all_turns else turns[-1:]):
        head = chat_ids(tokenizer, conv[:i], add_generation_prompt=True)
        upto = full if i == len(conv) - 1 else chat_ids(tokenizer, conv[:i + 1])
        end = len(upto)
        if full[:len(head)] != head or full[:end] != upto:
            raise UserError("tokenizer chat template: a conversation's prefix does not render as a prefix of its "
                            "tokens, so the assistant's turns cannot be isolated for the loss")
        labels[len(head):end] = full[len(head):end]
    return full, labels
