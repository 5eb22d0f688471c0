"""Each stage's settings, declared once.

A stage's config is a frozen dataclass whose fields are made by `setting`: the default, a
one-line help text, the choices, and how the command line spells and parses it. The
commands build their parsers from the configs (`add_arguments`, `from_arguments`), and the
Python API uses the configs as they are, so a default or a choice cannot differ between
the two. Nothing here imports torch: `--help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path
from typing import Any

# How a value is parsed from the command line, by kind.
PATH = "path"  # a local path (Path), "~" expanded
LOCATION = "location"  # a local path, or the URL of an object store (kept as a string)


def setting(default: Any = MISSING, *, help: str, flag: str | None = None, choices: tuple | None = None,
            parse: Callable[[str], Any] | str | None = None, metavar: str | None = None, negate: str | None = None,
            repeat: bool = False, cli: bool = True, factory: Callable[[], Any] | None = None) -> Any:
    """A config field with what the command line needs to know of it.

    flag: the option (default: --field-name); negate: a boolean that is on by default, turned off
    by this flag (--no-progress); parse: the converter (int, float, PATH, LOCATION, or a function);
    repeat: the flag may be given several times, collected into a tuple; cli=False: the Python
    API's only (or a command's own handling)."""
    meta = {"help": help, "flag": flag, "choices": choices, "parse": parse, "metavar": metavar, "negate": negate,
            "repeat": repeat, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def location(text: str | os.PathLike) -> Path | str:
    """A path setting: URLs of object stores stay strings (a Path would fold their '//'), the rest
    become Paths with '~' expanded."""
    text = str(text)
    if "://" in text and not text.startswith("file://"):
        return text.rstrip("/")
    return Path(text.removeprefix("file://")).expanduser()


def parse_path(text: str | os.PathLike) -> Path:
    return Path(str(text)).expanduser()


_PARSERS = {PATH: parse_path, LOCATION: location}


def or_auto(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """A parser for 'N or auto': "auto" gives None (resolved later by the stage), else convert(text)."""
    def parse(text: str):
        if text == "auto":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what}, or auto") from None
    parse.__name__ = f"{getattr(convert, '__name__', 'value')}_or_auto"
    return parse


def comma_list(text: str) -> tuple[str, ...]:
    """'layer2, layer3' -> ('layer2', 'layer3'); empty items dropped."""
    return tuple(s.strip() for s in str(text).split(",") if s.strip())


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def command_line_fields(cls) -> list[dataclasses.Field]:
    """The fields of config `cls` that its command offers, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.metadata["cli"]]


def converter(f: dataclasses.Field) -> Callable[[Any], Any] | None:
    """How a value of field `f` given as text (or as any path-like) becomes the field's type."""
    parse = f.metadata.get("parse")
    return _PARSERS.get(parse, parse) if isinstance(parse, str) or parse is None else parse


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """An option for every command-line field of config `cls`, with its default, choices and help."""
    for f in command_line_fields(cls):
        m, default = f.metadata, default_of(f)
        shown = "" if default in (None, False, True, MISSING, ()) else f" (default: {default})"
        if m["negate"]:
            parser.add_argument(m["negate"], dest=f.name, action="store_false", help=m["help"])
        elif isinstance(default, bool):
            parser.add_argument(flag_of(f), dest=f.name, action="store_true", help=m["help"])
        elif m["repeat"]:  # the config's default applies when the flag is not given (argparse would append to it)
            parser.add_argument(flag_of(f), dest=f.name, action="append", type=converter(f), metavar=m["metavar"],
                                default=None, help=m["help"] + " (repeatable)")
        else:
            required = default is MISSING
            parser.add_argument(flag_of(f), dest=f.name, type=converter(f), choices=m["choices"],
                                metavar=m["metavar"], required=required,
                                **({} if required else {"default": default}), help=m["help"] + shown)


def from_arguments(cls, args: argparse.Namespace, **given):
    """Config `cls` from parsed arguments (and `given` values for what the command computes itself)."""
    values = {}
    for f in command_line_fields(cls):
        value = getattr(args, f.name)
        if f.metadata["repeat"]:
            value = default_of(f) if value is None else tuple(value)
        values[f.name] = value
    return cls(**{**values, **given})


def from_python(cls, settings: dict):
    """Config `cls` from the Python API's keywords: paths given as strings (or any path-like) become
    what the command line would make of them."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; {cls.__name__} has {', '.join(known)}")
    values = {}
    for name, value in settings.items():
        parse = known[name].metadata.get("parse")
        if known[name].metadata.get("repeat") and isinstance(value, (str, os.PathLike)):
            value = (value,)  # one value where several may be given
        if parse in _PARSERS and value is not None:
            value = tuple(_PARSERS[parse](v) for v in value) if known[name].metadata["repeat"] else _PARSERS[parse](value)
        values[name] = value
    return cls(**values)
