"""Public names of a package, imported on first use: `import featrecon` and the configs (and
so every command's --help) must not pull in torch or zarr."""

from __future__ import annotations

from importlib import import_module


def exports(package: str, where: dict[str, str]):
    """A module `__getattr__` for `package` that finds each name of `where` ({name: submodule})."""
    def __getattr__(name: str):
        if name in where:
            return getattr(import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
