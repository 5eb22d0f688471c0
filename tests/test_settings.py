"""Settings declared once: how the command line reads them and how the Python API does."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from featrecon.settings import (
    LOCATION,
    PATH,
    add_arguments,
    comma_list,
    from_arguments,
    from_python,
    location,
    or_auto,
    setting,
)


@dataclass(frozen=True)
class Demo:
    where: Path | str = setting(Path("a.zarr"), parse=LOCATION, help="a location")
    folder: Path | None = setting(None, parse=PATH, help="a folder")
    size: int | None = setting(None, parse=or_auto(int, "a whole number"), help="N or auto")
    kind: str = setting("x", choices=("x", "y"), help="a choice")
    layers: tuple[str, ...] = setting(("a",), parse=comma_list, help="a list")
    fast: bool = setting(False, help="a switch")
    progress: bool = setting(True, negate="--no-progress", help="a switch that is on")
    files: tuple[Path, ...] = setting(flag="--file", parse=PATH, repeat=True, factory=tuple, help="repeatable")


def test_the_parser_is_built_from_the_fields():
    p = argparse.ArgumentParser()
    add_arguments(p, Demo)
    assert from_arguments(Demo, p.parse_args([])) == Demo()
    got = from_arguments(Demo, p.parse_args(["--where", "s3://b/c.zarr/", "--folder", "~/x", "--size", "auto", "--kind",
                                             "y", "--layers", "a, b,", "--fast", "--no-progress", "--file", "f1",
                                             "--file", "f2"]))
    assert got == Demo("s3://b/c.zarr", Path("~/x").expanduser(), None, "y", ("a", "b"), True, False,
                       (Path("f1"), Path("f2")))
    assert from_arguments(Demo, p.parse_args(["--size", "7"])).size == 7
    with pytest.raises(SystemExit):
        p.parse_args(["--kind", "z"])
    assert "(default: a.zarr)" in p.format_help()


def test_the_python_api_converts_paths_as_the_command_line_does():
    assert from_python(Demo, {"where": "~/c.zarr", "files": ["f1"]}) == Demo(Path("~/c.zarr").expanduser(),
                                                                             files=(Path("f1"),))
    assert location("file:///tmp/x") == Path("/tmp/x") and location("gs://b/x") == "gs://b/x"
    with pytest.raises(TypeError, match="unknown setting.*colour"):
        from_python(Demo, {"colour": 1})
