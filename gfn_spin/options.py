"""Documented config fields: the one way every config dataclass of the project is written.

For whoever adds a setting: ``name: type = option(default, "Help text.")`` (or
``option(factory=make_default, help=...)`` for a mutable or built default). The help lives in
the field's ``metadata["help"]``, where ``experiments.cli`` (and ``transformers.HfArgumentParser``)
read it, so ``--help`` and the code never drift apart; choices are ``typing.Literal`` types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 -- the name HfArgumentParser and argparse give it
    *,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **metadata: Any,
) -> Any:
    """A dataclass field with its help text (whitespace runs folded to one space) and any other
    metadata (e.g. ``derived=`` of :mod:`experiments.cli`)."""
    if not help:
        raise ValueError("every option needs its help text")
    metadata = {"help": " ".join(help.split()), **metadata}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
