"""The dependency rules of value_jax, checked two ways: what each module's source imports (ast, every
import statement, those inside functions included) and what importing a whole part of the
package actually loads (`sys.modules`, in a fresh interpreter).

  kernels  loads neither models nor probes
  probes   load no model (the configs, which carry the per-model facts, are allowed)
  models   load neither probes nor data
  data     loads no probe

"Models" are the Flax modules (`value_jax.models` and its submodules other than `configs`);
importing `value_jax.models.configs` runs the light `value_jax/models/__init__.py` only.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "value_jax"

MODEL_MODULES = ("value_jax.models.uniter", "value_jax.models.lxmert", "value_jax.models.layers")
# part -> (module prefixes of the part, forbidden module prefixes)
RULES = {
    "kernels": (("value_jax.kernels",), ("value_jax.models", "value_jax.probes")),
    "probes": (("value_jax.probes",), MODEL_MODULES),
    "models": (("value_jax.models",), ("value_jax.probes", "value_jax.data")),
    "data": (("value_jax.data",), ("value_jax.probes",)),
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative imports resolved."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from value_jax.probes import pairs` imports value_jax.probes.pairs.
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names] + [(node.lineno, base)]
    return out


def _forbidden(name: str, forbidden: tuple[str, ...]) -> bool:
    if name == "value_jax.models.configs" or name.startswith("value_jax.models.configs."):
        return False
    return any(name == f or name.startswith(f + ".") for f in forbidden)


def _part_files(prefixes):
    files = sorted(PACKAGE.rglob("*.py"))
    return [
        f
        for f in files
        if any(_module_name(f) == p or _module_name(f).startswith(p + ".") for p in prefixes)
    ]


@pytest.mark.parametrize("part", sorted(RULES))
def test_source_imports_follow_the_rules(part):
    prefixes, forbidden = RULES[part]
    files = _part_files(prefixes)
    assert files, part
    bad = [
        f"{f.relative_to(ROOT)}:{line} imports {name}"
        for f in files
        for line, name in _imports(f)
        if _forbidden(name, forbidden)
    ]
    assert not bad, "\n".join(bad)


_LOADED = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("part", sorted(RULES))
def test_importing_a_part_loads_nothing_forbidden(part):
    prefixes, forbidden = RULES[part]
    names = [_module_name(f) for f in _part_files(prefixes)]
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED, json.dumps(names)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = [m for m in loaded if _forbidden(m, forbidden)]
    assert not bad, f"importing {part} ({len(names)} modules) loads {bad}"


def test_importing_kernels_loads_no_orbax_and_no_other_part():
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED, json.dumps(["value_jax.kernels"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [m for m in loaded if m.startswith("value_jax")]
    assert ours == ["value_jax", "value_jax.kernels", "value_jax.kernels.kmeans"], ours
    assert not [m for m in loaded if m.startswith("orbax")]


def test_the_rule_checker_sees_a_violation(tmp_path):
    """The ast scan itself: planted forbidden imports (one relative, inside a function) are
    reported, the allowed configs import is not."""
    fake = tmp_path / "planted.py"
    fake.write_text(
        "from value_jax.models.configs import CONFIGS\n"
        "def f():\n    from ..models import uniter\n    return uniter\n"
    )
    found = [
        name
        for _, name in _imports(fake, "value_jax.probes.planted")
        if _forbidden(name, RULES["probes"][1])
    ]
    assert found == ["value_jax.models.uniter"]


# Functions of `experiments` allowed to read flag values: each script's `main` and the one place
# that turns flags into a RunConfig.
FLAG_READERS = {"main", "from_flags", "_script_flags", "_default"}


def _flag_reads(tree: ast.AST):
    """(line, function) of every `FLAGS` use inside a function, and every assignment to a flag."""
    found = []

    def uses_flags(node):
        return any(
            (isinstance(n, ast.Name) and n.id == "FLAGS")
            or (isinstance(n, ast.Attribute) and n.attr == "FLAGS")
            for n in ast.walk(node)
        )

    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.Lambda)) and getattr(fn, "name", "") not in (
            FLAG_READERS
        ):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Name, ast.Attribute)) and uses_flags(node):
                    found.append((node.lineno, getattr(fn, "name", "<lambda>")))
                    break
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and uses_flags(t.value) for t in targets):
                found.append((node.lineno, "assignment to a flag"))
    return found


def test_experiment_helpers_take_the_run_config_not_the_flags():
    """Flags are read once, in `main` (via `RunConfig.from_flags`), and never assigned."""
    bad = []
    for path in sorted((ROOT / "experiments").glob("*.py")):
        for line, where in _flag_reads(ast.parse(path.read_text(), str(path))):
            bad.append(f"{path.relative_to(ROOT)}:{line} ({where}) reads FLAGS")
    assert not bad, "\n".join(bad)


def test_the_flag_checker_sees_a_helper_reading_flags():
    planted = ast.parse(
        "def helper(cfg):\n    return FLAGS.seed\ndef main(argv):\n    FLAGS.model = 'x'\n"
    )
    assert [w for _, w in _flag_reads(planted)] == ["helper", "assignment to a flag"]
