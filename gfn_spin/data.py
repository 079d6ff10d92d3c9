"""Text to token ids for self-play: the chat turns, the one prompt/response encoding, and the
refusal of text that spells control tokens.

:func:`encode_example` is the *one* function that turns a prompt (and a response) into token
ids, for generation and for training alike (one chat template for both); :func:`chat_messages`
builds the turns it and the SPIN-style ``real``/``generated`` columns use.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any


class UnknownTokenWarning(UserWarning):
    """A prompt holds text the tokenizer cannot spell; it was encoded as the unknown token."""


def is_blank(prompt: str) -> bool:
    """The one rule for prompts given as text, for datasets and samplers alike: a prompt that
    is empty or only whitespace is refused (it gives the model nothing to respond to)."""
    return not prompt.strip()


# Tokenizers already warned about: the warning is shown once per tokenizer, not per prompt.
_WARNED: weakref.WeakSet = weakref.WeakSet()


def warn_unknown_tokens(tokenizer: Any, ids: Sequence[int], prompt: str) -> None:
    """Warn (once per tokenizer) when ``prompt`` was encoded with the unknown token, so that
    words outside the vocabulary do not silently become ``[UNK]``."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None or unknown not in ids or tokenizer in _WARNED:
        return
    _WARNED.add(tokenizer)
    warnings.warn(
        UnknownTokenWarning(
            f"the prompt {prompt!r:.80} holds text this tokenizer cannot spell; it was encoded "
            f"as {tokenizer.unk_token!r} (token {unknown}), which the model reads as one "
            "unknown word. Write prompts in the model's vocabulary (this warning is shown once)"
        ),
        stacklevel=3,
    )


def chat_messages(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    """A user turn and an assistant turn, the format of SPIN's ``real``/``generated`` columns;
    the user turn alone without a response (what generation is prompted with)."""
    turns = [{"role": "user", "content": prompt}]
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return turns


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's control tokens (BOS, EOS, PAD, chat markers, ...), without UNK.

    UNK stands for text the vocabulary cannot spell; it is not a control token.
    """
    found = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for index, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            found.add(int(index))
    found.discard(getattr(tokenizer, "unk_token_id", None))
    return found


def first_problems(problems: Sequence[str], separator: str, counted: str) -> str:
    """The first five ``problems`` of an error message, joined by ``separator``, and how many
    ``counted`` there are in all when some are left out."""
    more = f"{separator}... ({len(problems)} {counted} in all)" if len(problems) > 5 else ""
    return separator.join(problems[:5]) + more


def check_no_special_tokens(
    tokenizer: Any,
    texts: Sequence[str],
    argument: str = "the dataset",
    labels: Sequence[str] | None = None,
) -> None:
    """Refuse texts that tokenize to a control token (a literal ``</s>`` would end a response).

    Data is text: each text is tokenized as it will be (without the special tokens that the
    tokenizer adds itself), and a text yielding a special token's id is refused with a
    ValueError naming ``argument``, the rows (``labels``, else "row i" counted from 0) and
    the tokens found.
    """
    texts = list(texts)
    labels = list(labels) if labels is not None else [f"row {i}" for i in range(len(texts))]
    specials = special_token_ids(tokenizer)
    if not texts or not specials:
        return
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bad = []
    for row, ids in enumerate(encoded):
        hits = sorted(specials.intersection(ids))
        if hits:
            names = tokenizer.convert_ids_to_tokens(hits[:3])
            bad.append(f"{labels[row]} ({', '.join(repr(n) for n in names)})")
    if bad:
        raise ValueError(
            f"{argument} has text that spells the tokenizer's special tokens, which would turn "
            f"into control tokens: {first_problems(bad, ', ', 'rows')}. Remove or escape them in these rows"
        )


def uses_chat_template(tokenizer: Any, chat_template: bool | None = None) -> bool:
    """The one rule for encoding a string prompt, shared by the sampler API (:class:`Policy`)
    and self-play's command line: through the tokenizer's chat template as a user turn
    whenever the tokenizer has one, unless ``chat_template=False``.

    Raises:
        ValueError: ``chat_template=True`` for a tokenizer without a chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise ValueError(
            "chat_template=True but the tokenizer has no chat template; leave chat_template "
            "unset (None) to encode plain text"
        )
    return bool(chat_template)


def encode_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    chat_template: bool | None = None,
    max_prompt_length: int | None = None,
) -> list[int]:
    """Token ids of a prompt, by :func:`uses_chat_template`'s rule: as a user turn ending in the
    generation prompt, or the bare text with the tokenizer's special tokens.

    Over-long prompts keep their last ``max_prompt_length`` tokens (the generation prompt at
    the end of the template must survive).
    """
    if uses_chat_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template(
            chat_messages(prompt), tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    warn_unknown_tokens(tokenizer, ids, prompt)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]
    return list(ids)


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str | None = None,
    *,
    max_prompt_length: int | None = None,
    max_new_tokens: int | None = None,
) -> tuple[list[int], list[int] | None]:
    """The one prompt/response → token ids map, for generation and training alike.

    The prompt is encoded by :func:`encode_prompt` (the chat template whenever the tokenizer
    has one, the rule the sampler API follows too); the response is the assistant text's tokens without special tokens, cut at the length
    cap ``max_new_tokens`` (the stop there is forced, docs/conventions.md; otherwise EOS ends it, which
    is the policy's convention, not a token of the response).

    Returns:
        (prompt_ids, response_ids); response_ids is None without a response.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length=max_prompt_length)
    if response is None:
        return prompt_ids, None
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if max_new_tokens is not None:
        response_ids = response_ids[:max_new_tokens]
    return prompt_ids, response_ids
