"""Command lines of the runnable studies, generated from their config dataclasses.

For whoever writes a study: declare one dataclass whose fields carry their documentation
(``gfn_spin.options.option(default, "help")``, stored in ``metadata["help"]``) and their choices as ``typing.Literal`` types;
:func:`parse_config` turns it into a ``transformers.HfArgumentParser`` command line, so
``--help`` and the code never drift apart. HfArgumentParser maps each field to argparse
(``Literal`` → choices, ``bool`` → ``--flag`` / ``--flag false`` / ``--no-flag``, lists →
space-separated values, ``X | None``); this module adds what it lacks:

- **nested configs**: a field whose type is a dataclass (a study's ``GFlowNetConfig``) is
  exposed field by field under its name, ``--gflownet.learning-rate``, with the study's default
  instance giving each default; the nested field's ``metadata["derived"]`` names the fields the
  study sets itself (the length cap, the seed, the adapter name), which get no flag;
- **tuples**: a tuple field is given as space-separated values and comes back a tuple;
- **one ``--quick`` convention**: a config with a ``quick`` field declares
  ``QUICK: ClassVar[dict]`` (flag destination → value, ``"gflownet.steps"`` for a nested
  field); with ``--quick`` each listed setting still at its default takes the quick value, and
  a value given on the command line wins. A study whose module is the main module of spawned
  workers sets ``Config.QUICK = {...}`` after the class instead (see experiments/alpha_spin.py).

Help text of a config documented the older way (a string literal under each field) is read
from its source, so configs of other packages get the same ``--help``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, TypeVar

from transformers import HfArgumentParser

ConfigT = TypeVar("ConfigT")


def field_docs(cls: type) -> dict[str, str]:
    """Help of each field of a dataclass: ``metadata["help"]``, else the literal under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, following in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    for field in dataclasses.fields(cls):
        if "help" in field.metadata:
            docs[field.name] = " ".join(field.metadata["help"].split())
    return docs


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _non_none(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def _flag_type(hint: Any) -> Any:
    """The type HfArgumentParser is given: tuples as lists, ``int | str`` as str."""
    members = _non_none(hint)
    if len(members) > 1:  # e.g. ``int | str``: parsed as text, converted back by _restore
        return str
    (inner,) = members
    if typing.get_origin(inner) is tuple:
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        inner = list[args[0] if args else str]
    optional = type(None) in typing.get_args(hint)
    return inner | None if optional else inner


def _restore(value: Any, hint: Any) -> Any:
    """A parsed value back in the field's own type (tuples; the first member of a union that
    takes the text)."""
    members = _non_none(hint)
    if value is None:
        return None
    if len(members) > 1 and isinstance(value, str):
        for member in members:
            if member is str:
                return value
            try:
                return member(value)
            except (TypeError, ValueError):
                continue
        return value
    if typing.get_origin(members[0]) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _flags(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, Any, Any, str]]:
    """(destination, type hint, default, help) of every flag of ``cls``, nested ones included."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = _default(field) if defaults is None else getattr(defaults, field.name)
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            derived = set(field.metadata.get("derived", ()))
            nested = [
                flag
                for flag in _flags(hint, f"{prefix}{field.name}.", default)
                if flag[0].rsplit(".", 1)[1] not in derived
            ]
            out += nested
            continue
        out.append((prefix + field.name, hint, default, docs.get(field.name, "")))
    return out


def build_parser(cls: type, description: str | None = None) -> HfArgumentParser:
    """The command line of the config dataclass ``cls`` (see the module docstring)."""
    parser = HfArgumentParser(
        description=description or (inspect.getdoc(cls) or "").split("\n\n")[0]
    )
    for dest, hint, default, text in _flags(cls):
        field = dataclasses.field(metadata={"help": text.replace("%", "%%") or " "})
        if isinstance(default, tuple | list):
            field.default_factory = lambda value=default: list(value)
        elif default is not dataclasses.MISSING:
            field.default = default
        field.name, field.type = dest, _flag_type(hint)
        # HfArgumentParser exposes no per-field entry point; this static method is the one its
        # own constructor calls for each field, here with a prefixed name for nested configs.
        HfArgumentParser._parse_dataclass_field(parser, field)
    return parser


def parse_config(
    cls: type[ConfigT], argv: list[str] | None = None, description: str | None = None
) -> ConfigT:
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``cls``."""
    parser = build_parser(cls, description)
    values = vars(parser.parse_args(argv))
    if values.get("quick"):
        for dest, value in getattr(cls, "QUICK", {}).items():
            if values[dest] == parser.get_default(dest):
                values[dest] = value
    return _build(cls, values)


def _build(cls: type, values: dict[str, Any], prefix: str = "", defaults: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint, key = hints[field.name], prefix + field.name
        if dataclasses.is_dataclass(hint):
            nested = _default(field) if defaults is None else getattr(defaults, field.name)
            kwargs[field.name] = _build(hint, values, key + ".", nested)
        elif key in values:
            kwargs[field.name] = _restore(values[key], hint)
    if defaults is not None:  # a nested config: the study's instance with the given changes
        return dataclasses.replace(defaults, **kwargs)
    return cls(**kwargs)
