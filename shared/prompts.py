"""Prompt text to token ids, the one way both the offline LLM and the HTTP frontend do it, so
the same request gives the same tokens (and the same output) through either."""

from __future__ import annotations

from typing import Any

from tandem.shared.sampling_params import InvalidParameterError


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template: str | None = None,
    fallback_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The conversation rendered with the model's chat template (or `chat_template`)."""
    if tokenizer is None:
        raise InvalidParameterError("messages", "chat needs a tokenizer (skip_tokenizer_init=True)")
    template = chat_template or getattr(tokenizer, "chat_template", None) or fallback_template
    if template is None:
        raise InvalidParameterError("messages", "the model has no chat template; pass chat_template")
    if continue_final_message and add_generation_prompt:
        raise InvalidParameterError(
            "continue_final_message", "cannot be combined with add_generation_prompt (set it to false)"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, chat_template=template, **(template_kwargs or {}),
        )
    except Exception as exc:  # the template's own errors: jinja2.TemplateError, raise_exception(...)
        if isinstance(exc, ValueError | TypeError | KeyError) or type(exc).__module__.startswith("jinja2"):
            raise InvalidParameterError("messages", f"the chat template failed: {exc}") from None
        raise


def encode_text(tokenizer: Any, text: str, *, chat_rendered: bool, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of `text`. A rendered chat template already holds its special tokens (BOS
    included), so they are not added twice."""
    if tokenizer is None:
        raise InvalidParameterError("prompt", "text prompts need a tokenizer (skip_tokenizer_init=True)")
    if add_special_tokens is None:
        add_special_tokens = not chat_rendered
    return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
