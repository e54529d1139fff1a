"""Chat rendering, in one place: every stage, prepare's length check and the evaluation render a
conversation through these functions, so the length prepare checks is the length a stage feeds the model."""
from __future__ import annotations

from refinery.data.packing import IGNORE
from refinery.errors import UserError


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A single-turn user prompt followed by the assistant header: what generation starts from."""
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def conversation_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """The user prompt and the assistant's answer with its end-of-turn token."""
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def render_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the chat-rendered conversation; prompt tokens (system + user + the assistant
    header) are masked with -100, so only the response and its end-of-turn token are learned."""
    head = prompt_ids(tokenizer, prompt)
    full = conversation_ids(tokenizer, prompt, response)
    if full[:len(head)] != head:
        raise UserError("tokenizer chat template: the rendered prompt is not a prefix of the rendered "
                        "conversation, so the response cannot be isolated for the loss")
    return full, [IGNORE] * len(head) + full[len(head):]
