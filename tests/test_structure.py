"""The package's shape: every module imports alone, no import cycles, no upward or private
imports, one source of every setting, and a wheel that holds every subpackage."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import featrecon
from featrecon import api, cli
from featrecon.evaluate.config import ScoreConfig
from featrecon.extract.config import ExtractConfig
from featrecon.settings import command_line_fields, default_of, from_arguments, from_python
from featrecon.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "featrecon"


def modules() -> dict[str, Path]:
    """featrecon's modules by dotted name (packages by their name)."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of featrecon code in a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "featrecon" or target.startswith("featrecon."):
                found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("featrecon")]
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the featrecon modules it imports (a name that is a submodule counts as that module)."""
    mods = modules()
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        for target, names in imports(m, p):
            subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in mods}
            edges[m] |= subs if subs and len(subs) == len(names) else ({target} | subs) & set(mods)
        edges[m].discard(m)
    return edges


def test_the_import_graph_has_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_upward_imports_and_no_private_names_across_modules():
    """Nothing imports its own package's __init__ (errors and the version have modules of their own),
    and no module takes another's private name."""
    upward, private = [], []
    for m, p in modules().items():
        for target, names in imports(m, p):
            if (PACKAGE.parent / Path(*target.split("."))).is_dir() and m.startswith(target + ".") and \
                    not {f"{target}.{n}" for n in names} <= set(modules()):
                upward.append(f"{m} -> {target}: {', '.join(names)}")
            private += [f"{m} takes {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not upward and not private, upward + private


IMPORT_EACH = """
import multiprocessing, sys
for heavy in ("torch", "torchvision", "numpy", "zarr", "h5py", "hdf5plugin", "PIL.Image", "scipy.stats", "matplotlib",
              "tqdm", "skimage"):
    __import__(heavy)
assert not [m for m in sys.modules if m.startswith("featrecon")]

def load(name):
    import importlib
    importlib.import_module(name)

failed = []
for name in sys.argv[1:]:
    proc = multiprocessing.get_context("fork").Process(target=load, args=(name,))
    proc.start()
    proc.join(60)
    if proc.exitcode != 0:
        proc.kill()
        failed.append(name)
print(" ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter_state():
    """Each module imported first, with no featrecon module loaded before it: an import cycle, or a
    module that relies on another being imported first, fails here. A fresh interpreter loads the
    third-party libraries once and forks a child per module from that state (an interpreter per
    module would spend a minute importing torch)."""
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, *modules()], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, f"these modules fail to import first: {done.stdout} {done.stderr[-2000:]}"


def test_the_commands_and_their_help_import_no_torch():
    code = ("import sys, featrecon.cli as c\n"
            "for make in (c.extract_parser, c.train_parser, c.score_parser, c.verify_parser): make().format_help()\n"
            "heavy = [m for m in ('torch', 'zarr', 'h5py') if m in sys.modules]\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


COMMANDS = [(cli.extract_parser, ExtractConfig, [], {}),
            (cli.train_parser, TrainConfig, ["--layer", "layer3"], {"layers": ("layer3",)}),
            (cli.score_parser, ScoreConfig, [], {})]
COMMAND_ONLY = {"help", "stats", "storage_option", "verbose"}  # options of a command that no stage setting is


@pytest.mark.parametrize("parser,config,required,given", COMMANDS, ids=["extract", "train", "score"])
def test_every_option_has_the_python_apis_default(parser, config, required, given):
    p = parser()
    options = {a.dest for a in p._actions} - COMMAND_ONLY
    assert options == {f.name for f in command_line_fields(config)}  # every option is a setting, and back
    args = p.parse_args(required)
    for f in command_line_fields(config):  # the parser's own defaults are the config's (repeatable: none given)
        value = getattr(args, f.name)
        if f.metadata["repeat"]:
            assert value is None, f.name
            continue
        assert value == given.get(f.name, default_of(f)), f.name
    assert from_arguments(config, args) == config(**given) == from_python(config, given)


def test_the_python_api_takes_every_setting_and_the_drifted_one_agrees():
    assert ExtractConfig().views is None and cli.extract_parser().parse_args([]).views is None  # auto in both
    for config in (ExtractConfig, TrainConfig, ScoreConfig):
        assert all("help" in f.metadata for f in dataclasses.fields(config))  # declared with setting()
    with pytest.raises(TypeError, match="unknown setting"):
        api.extract_features(colour="blue")
    assert featrecon.__version__ == featrecon.version.__version__


@pytest.mark.slow
def test_a_wheel_built_from_the_tracked_files_holds_every_subpackage(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("featrecon-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")} | {"featrecon/extract/imagenet_wnids.txt"}
    assert expected <= names, sorted(expected - names)
    assert f"featrecon-{featrecon.__version__}.dist-info/METADATA" in names
