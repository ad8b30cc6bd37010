"""Prompt templates: a prompt as the model sees it.

>>> format_prompt(None, "Why?", template=lambda p: f"Q: {p} A:")
'Q: Why? A:'
"""

from __future__ import annotations

from typing import Callable, Union

from ..errors import DataError

Template = Union[None, str, Callable[[str], str]]


def format_prompt(tokenizer, prompt: str, template: Template = None) -> str:
    """A prompt as the model sees it, after ``template``.

    >>> format_prompt(None, "Why?", template=lambda p: f"Q: {p} A:"), format_prompt(None, "Why?")
    ('Q: Why? A:', 'Why?')

    ``template``: None (as is), ``"chat"`` (the tokenizer's chat template, one user turn,
    ready for the assistant's answer) or a function of the prompt. A tokenizer without a
    chat template is refused for ``"chat"`` (before any forward pass):

    >>> import reftgraph as rg
    >>> format_prompt(rg.models.tiny("llama").tokenizer, "Why?", template="chat")   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.DataError: template='chat' needs a chat template, and the tokenizer of this model has none; ...
    """
    if template is None:
        return prompt
    if template == "chat":
        check_chat_template(tokenizer)
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if callable(template):
        return template(prompt)
    check_template(template)


def check_chat_template(tokenizer, model_name: str = "") -> None:
    """A DataError unless ``tokenizer`` has a chat template (``template="chat"`` needs one).

    >>> import reftgraph as rg
    >>> check_chat_template(rg.models.tiny("llama").tokenizer, "tiny-llama")   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.DataError: template='chat' needs a chat template, and the tokenizer of 'tiny-llama' has none; ...
    """
    if getattr(tokenizer, "chat_template", None):
        return
    name = model_name or getattr(tokenizer, "name_or_path", "")
    raise DataError(f"template='chat' needs a chat template, and the tokenizer of "
                    f"{repr(name) if name else 'this model'} has none; pass template=None to use the prompts "
                    "as they are (reftgraph generate: --no-template; a spec: data.template: null)")


def check_template(template) -> None:
    """A DataError unless ``template`` is None, ``"chat"`` or a function.

    >>> check_template("chat"); check_template("Q:")
    Traceback (most recent call last):
    ...
    reftgraph.errors.DataError: template must be None, 'chat' or a function, got 'Q:'
    """
    if not (template is None or template == "chat" or callable(template)):
        raise DataError(f"template must be None, 'chat' or a function, got {template!r}")
