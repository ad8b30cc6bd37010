"""Prompt templates: a prompt as the model sees it.

>>> format_prompt(None, "Why?", template=lambda p: f"Q: {p} A:")
'Q: Why? A:'
"""

from __future__ import annotations

from typing import Callable, Union

Template = Union[None, str, Callable[[str], str]]


def format_prompt(tokenizer, prompt: str, template: Template = None) -> str:
    """A prompt as the model sees it, after ``template``.

    >>> format_prompt(None, "Why?", template=lambda p: f"Q: {p} A:"), format_prompt(None, "Why?")
    ('Q: Why? A:', 'Why?')

    ``template``: None (as is), ``"chat"`` (the tokenizer's chat template, one user turn,
    ready for the assistant's answer) or a function of the prompt.
    """
    if template is None:
        return prompt
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if callable(template):
        return template(prompt)
    check_template(template)


def check_template(template) -> None:
    """A ValueError unless ``template`` is None, ``"chat"`` or a function.

    >>> check_template("chat"); check_template("Q:")
    Traceback (most recent call last):
    ...
    ValueError: template must be None, 'chat' or a function, got 'Q:'
    """
    if not (template is None or template == "chat" or callable(template)):
        raise ValueError(f"template must be None, 'chat' or a function, got {template!r}")
