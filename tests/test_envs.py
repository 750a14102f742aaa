"""The conda env of every rule provides what the rule's script imports (checked as text).

Conda cannot run on the test machines, so the env files are checked statically:

* every rule that runs code (``script:``, ``shell:``, ``notebook:``, ``wrapper:``) names an env
  with ``conda:``; ``run:`` blocks execute inside Snakemake's own process, where Snakemake forbids
  ``conda:``, and pure target rules (only ``input:``) run nothing;
* every env parses, uses exactly the channels conda-forge + nodefaults and pins every package
  (``name=x.y.z``; ``name==x.y.z`` in its ``pip:`` section);
* every third-party module that a rule's script imports, directly or through the ``omniseg``
  modules it reaches (followed statically with ``ast``, function-level imports included), is
  provided by the rule's env, through ``workflow/envs/import_map.yaml``;
* the pins satisfy pyproject.toml's bounds and one package has one pin across all envs;
* every pin is a version conda-forge has: ``workflow/envs/conda-forge-versions.tsv`` lists the
  versions read from each package's conda-forge feedstock, with the date they were checked.

The scripts import the installed ``omniseg`` (no ``sys.path`` inserts, which work in a clone
only): each env's post-deploy script installs the package from the workflow's own source tree.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflow"
ENV_DIR = WORKFLOW / "envs"
IMPORT_MAP = ENV_DIR / "import_map.yaml"
CONDA_FORGE_VERSIONS = ENV_DIR / "conda-forge-versions.tsv"
SRC = REPO / "src"
PACKAGE = "omniseg"
CHANNELS = ["conda-forge", "nodefaults"]
# Directives that run code in a job, hence need an env (run: executes in Snakemake's process).
CODE_DIRECTIVES = ("script", "shell", "notebook", "wrapper")
CONDA_PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)=(?P<version>\d+(\.[0-9A-Za-z]+)+)$")
PIP_PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)==(?P<version>\d+(\.[0-9A-Za-z]+)+)$")


# -- the rules ----------------------------------------------------------------------------------
@dataclass
class Rule:
    """One rule of the workflow as written: its directives and their raw values."""

    name: str
    file: Path
    line: int
    directives: dict[str, str] = field(default_factory=dict)
    base: str | None = None  # `use rule BASE as NAME` inherits BASE's directives

    def where(self) -> str:
        return f"rule {self.name} ({self.file.relative_to(REPO)}:{self.line})"

    def path_of(self, directive: str) -> Path | None:
        """The file a directive names, resolved like Snakemake: relative to the rule's file."""
        value = self.directives.get(directive)
        if value is None:
            return None
        literal = re.fullmatch(r"\s*(['\"])(.+?)\1\s*,?\s*", value)
        if literal is None:
            pytest.fail(f"{self.where()}: {directive}: must be a literal path, got {value!r}")
        return (self.file.parent / literal.group(2)).resolve()


RULE_RE = re.compile(r"^(?P<indent>\s*)(?:rule|checkpoint)\s+(?P<name>\w+)\s*:\s*(#.*)?$")
USE_RE = re.compile(
    r"^(?P<indent>\s*)use\s+rule\s+(?P<base>\w+)\s+(?:from\s+\w+\s+)?as\s+(?P<name>\w+)"
    r"(?P<with>\s+with\s*:)?\s*(#.*)?$"
)
DIRECTIVE_RE = re.compile(r"^(?P<indent>\s*)(?P<key>\w+)\s*:(?P<value>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def parse_rules(path: Path) -> list[Rule]:
    """Rules of one Snakefile or .smk file: names, line numbers and directive values.

    A directive's value is the rest of its line plus the following lines indented deeper.
    """
    lines = path.read_text().splitlines()
    rules = []
    i = 0
    while i < len(lines):
        m = RULE_RE.match(lines[i]) or USE_RE.match(lines[i])
        if m is None:
            i += 1
            continue
        rule = Rule(m["name"], path, i + 1, base=m.groupdict().get("base"))
        rules.append(rule)
        top = len(m["indent"])
        i += 1
        if rule.base is not None and not m["with"]:
            continue
        body_indent = None
        key = None
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.lstrip().startswith("#"):
                i += 1
                continue
            ind = _indent(line)
            if ind <= top:
                break
            if body_indent is None:
                body_indent = ind
            d = DIRECTIVE_RE.match(line)
            if ind == body_indent and d is not None:
                key = d["key"]
                rule.directives[key] = d["value"].strip()
            elif key is not None:
                rule.directives[key] = (rule.directives[key] + " " + line.strip()).strip()
            i += 1
    return rules


def workflow_files() -> list[Path]:
    return [WORKFLOW / "Snakefile", *sorted((WORKFLOW / "rules").glob("*.smk"))]


def all_rules() -> list[Rule]:
    """Every rule of every workflow file (both branches of an `if` included)."""
    rules = [r for f in workflow_files() for r in parse_rules(f)]
    by_name = {r.name: r for r in rules if r.base is None}
    for rule in rules:
        if rule.base is not None:
            if rule.base not in by_name:
                pytest.fail(f"{rule.where()}: `use rule {rule.base}`: no such rule")
            rule.directives = {**by_name[rule.base].directives, **rule.directives}
    return rules


def code_rules() -> list[Rule]:
    return [r for r in all_rules() if any(d in r.directives for d in CODE_DIRECTIVES)]


# -- the envs -----------------------------------------------------------------------------------
@dataclass
class Env:
    """A conda env file: its pinned packages, conda and pip, by canonical name."""

    path: Path
    channels: list
    conda: dict[str, str]  # canonical name -> pinned version
    pip: dict[str, str]
    unpinned: list[str]

    @property
    def packages(self) -> dict[str, str]:
        return {**self.conda, **self.pip}


def load_env(path: Path) -> Env:
    """Parse an env file; raise ValueError naming the file if it is not a conda env."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"env {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("dependencies"), list):
        raise ValueError(f"env {path} has no `dependencies:` list")
    conda, pip, unpinned = {}, {}, []
    for dep in data["dependencies"]:
        if isinstance(dep, dict) and set(dep) == {"pip"}:
            for spec in dep["pip"] or []:
                m = PIP_PIN.match(str(spec).strip())
                if m is None:
                    unpinned.append(f"pip: {spec}")
                else:
                    pip[canonicalize_name(m["name"])] = m["version"]
            continue
        m = CONDA_PIN.match(str(dep).strip())
        if m is None:
            unpinned.append(str(dep))
        else:
            conda[canonicalize_name(m["name"])] = m["version"]
    return Env(path, data.get("channels"), conda, pip, unpinned)


def env_files() -> list[Path]:
    return sorted(p for p in ENV_DIR.glob("*.yaml") if p != IMPORT_MAP)


def load_import_map() -> tuple[dict[str, list[str]], dict[str, str]]:
    """(import name -> canonical conda/pip package names, conda name -> PyPI name)."""
    data = yaml.safe_load(IMPORT_MAP.read_text())
    imports = {
        name: [canonicalize_name(p) for p in ([pkgs] if isinstance(pkgs, str) else pkgs)]
        for name, pkgs in data["imports"].items()
    }
    pypi = {canonicalize_name(k): canonicalize_name(v) for k, v in data.get("pypi", {}).items()}
    return imports, pypi


def pyproject() -> tuple[dict[str, SpecifierSet], SpecifierSet]:
    """(PyPI name -> specifier of [project].dependencies, requires-python)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = {}
    for spec in project["dependencies"]:
        req = Requirement(spec)
        reqs[canonicalize_name(req.name)] = req.specifier
    return reqs, SpecifierSet(project.get("requires-python", ""))


# -- what a script imports ----------------------------------------------------------------------
@dataclass(frozen=True)
class ThirdParty:
    """A third-party import found in the code a script reaches."""

    name: str  # top-level module name, e.g. "torch"
    where: str  # the module (or script) that imports it, and the line
    chain: tuple[str, ...]  # how the script reaches that module


class ImportWalker:
    """Static reach of the package's imports, per symbol.

    Importing a module runs its module-level code (and its parent packages'); calling a function
    runs the imports inside it. So ``from omniseg.steps.rois import train_model`` reaches the
    module-level imports of ``omniseg.steps.rois`` plus those in ``train_model`` and in every
    module-level function or imported package symbol that it names, followed into other
    ``omniseg`` modules transitively. A whole-module import (``import omniseg.x``) reaches every
    import in that module.
    """

    def __init__(self, src: Path = SRC, package: str = PACKAGE):
        self.src = src
        self.package = package
        self._index: dict[str, tuple[ast.Module, dict[str, ast.AST], dict[str, tuple]]] = {}

    def module_file(self, module: str) -> Path | None:
        base = self.src.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def index(self, module: str) -> tuple[ast.Module, dict[str, ast.AST], dict[str, tuple]]:
        """(tree, top-level name -> its def/class/assignment, alias -> (module, symbol)).

        The aliases are the package symbols bound by module-level ``from ... import``.
        """
        if module not in self._index:
            path = self.module_file(module)
            if path is None:
                raise LookupError(module)
            tree = ast.parse(path.read_text(), filename=str(path))
            local: dict[str, ast.AST] = {}
            aliases: dict[str, tuple] = {}
            for node in tree.body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    local[node.name] = node
                elif isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    local.update({t.id: node for t in targets if isinstance(t, ast.Name)})
            for node in _module_level(tree):
                if isinstance(node, ast.ImportFrom):
                    target = self._absolute(node, module)
                    if target.split(".")[0] == self.package:
                        for alias in node.names:
                            aliases[alias.asname or alias.name] = (target, alias.name)
            self._index[module] = (tree, local, aliases)
        return self._index[module]

    def third_party(self, script: Path) -> tuple[list[ThirdParty], list[str]]:
        """(third-party imports reached from ``script``, missing package modules it reaches)."""
        tree = ast.parse(script.read_text(), filename=str(script))
        found: list[ThirdParty] = []
        missing: list[str] = []
        seen: set[tuple[str, str | None]] = set()
        origin = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else str(script)
        queue: list[tuple[str, str | None, tuple[str, ...]]] = []
        for node in ast.walk(tree):
            self._collect(node, None, origin, (origin,), found, queue, top_level=False)
        while queue:
            module, symbol, chain = queue.pop()
            if (module, symbol) in seen:
                continue
            seen.add((module, symbol))
            try:
                tree, local, aliases = self.index(module)
            except LookupError:
                missing.append(f"{module} (via {' -> '.join(chain)})")
                continue
            chain = (*chain, module if symbol is None else f"{module}.{symbol}")
            parts = module.split(".")
            queue += [(".".join(parts[:i]), None, chain) for i in range(1, len(parts))]
            if symbol is None:
                nodes = list(_module_level(tree))
            else:
                queue.append((module, None, chain))
                if symbol == "*":
                    nodes = list(ast.walk(tree))
                elif symbol in aliases:
                    queue.append((*aliases[symbol], chain))
                    nodes = []
                else:  # a def, class or assignment; or a constant we cannot see into
                    nodes = list(ast.walk(local[symbol])) if symbol in local else []
            for node in nodes:
                if isinstance(node, ast.Name) and node.id != symbol:
                    if node.id in local:
                        queue.append((module, node.id, chain))
                    elif node.id in aliases:
                        queue.append((*aliases[node.id], chain))
                self._collect(node, module, module, chain, found, queue, symbol is None)
        return found, missing

    def _absolute(self, node: ast.ImportFrom, module: str | None) -> str:
        """The absolute module name of a (possibly relative) ``from ... import``."""
        if not node.level:
            return node.module or ""
        base = (module or "").split(".")
        # a package's __init__ is the package itself; a plain module's package is its parent
        is_pkg = module is not None and self.module_file(module).name == "__init__.py"
        base = base if is_pkg else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)

    def _collect(self, node, module, where, chain, found, queue, top_level) -> None:
        """Record a third-party import, or queue the package module or symbol it names.

        A module-level ``from omniseg.x import f`` runs ``omniseg.x`` but not ``f``: ``f`` is
        followed only where reached code names it (see ``index``).
        """
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == self.package:
                    queue.append((alias.name, "*", chain))
                elif _is_third_party(top):
                    found.append(ThirdParty(top, f"{where}:{node.lineno}", chain))
        elif isinstance(node, ast.ImportFrom):
            target = self._absolute(node, module)
            top = target.split(".")[0]
            if top == self.package:
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if alias.name != "*" and self.module_file(sub) is not None:
                        queue.append((sub, "*", chain))  # a submodule: used how, we cannot tell
                    elif alias.name == "*":
                        queue.append((target, "*", chain))
                    else:
                        queue.append((target, None if top_level else alias.name, chain))
            elif top and _is_third_party(top):
                found.append(ThirdParty(top, f"{where}:{node.lineno}", chain))


def _is_third_party(top: str) -> bool:
    return top not in sys.stdlib_module_names and top != "__future__"


def _module_level(tree: ast.Module) -> Iterator[ast.AST]:
    """Nodes executed on import: everything but function bodies and `if TYPE_CHECKING:`."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            stack.extend(node.decorator_list if not isinstance(node, ast.Lambda) else [])
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


# -- tests: the walker on a synthetic package -----------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_walker_follows_symbols_not_whole_modules(tmp_path):
    _write(
        tmp_path / "src",
        {
            "pkg/__init__.py": "import json\n",
            "pkg/light.py": "import numpy\n\ndef f():\n    import scipy\n",
            "pkg/hub.py": (
                "import pandas as pd\n"
                "from pkg.light import f\n\n"
                "def helper():\n    from pkg.heavy import train\n    return train\n\n"
                "def data():\n    import h5py\n    return _private()\n\n"
                "def _private():\n    import yaml\n\n"
                "def model():\n    return helper()\n"
            ),
            "pkg/heavy.py": (
                "import torch\n\ndef train():\n    import kornia\n\n"
                "def plot():\n    import matplotlib\n"
            ),
            "pkg/sub/__init__.py": "from .mod import g\n",
            "pkg/sub/mod.py": "import tifffile\n\ndef g():\n    from ..light import f\n    return f()\n",
        },
    )
    walker = ImportWalker(tmp_path / "src", "pkg")

    def reached(text: str) -> set[str]:
        script = tmp_path / "script.py"
        script.write_text(text)
        found, missing = walker.third_party(script)
        assert not missing
        return {t.name for t in found}

    # module level of hub (pandas) and light (numpy), data() and the function it calls
    assert reached("from pkg.hub import data\n") == {"pandas", "numpy", "h5py", "yaml"}
    # model() -> helper() -> pkg.heavy.train: torch (module level) and kornia, not matplotlib
    assert reached("from pkg.hub import model\n") == {"pandas", "numpy", "torch", "kornia"}
    # a whole-module import reaches every import of the module
    assert reached("import pkg.heavy\n") == {"torch", "kornia", "matplotlib"}
    # relative imports inside a subpackage; third-party imports of the script itself count too
    want = {"PIL", "tifffile", "numpy", "scipy"}
    assert reached("import PIL.Image\nfrom pkg.sub import g\n") == want


def test_walker_reports_missing_package_modules(tmp_path):
    _write(tmp_path / "src", {"pkg/__init__.py": "", "pkg/a.py": "def f():\n    import pkg.b\n"})
    script = tmp_path / "s.py"
    script.write_text("from pkg.a import f\n")
    _, missing = ImportWalker(tmp_path / "src", "pkg").third_party(script)
    assert len(missing) == 1 and missing[0].startswith("pkg.b ")


def test_rule_parser_reads_directives(tmp_path):
    smk = tmp_path / "rules" / "x.smk"
    smk.parent.mkdir()
    smk.write_text(
        "if COND:\n\n"
        "    rule a:\n"
        "        input:\n            'in.txt',\n"
        "        conda:\n            '../envs/data.yaml'\n"
        "        script:\n            '../scripts/a.py'\n\n"
        "else:\n\n"
        "    rule b:\n        output: 'x'\n        shell: 'touch {output}'\n\n"
        "rule target:\n    input:\n        expand('{x}', x=X),\n"
        "use rule a as c with:\n    conda:\n        '../envs/torch.yaml'\n"
    )
    rules = {r.name: r for r in parse_rules(smk)}
    assert set(rules) == {"a", "b", "target", "c"}
    assert rules["a"].path_of("conda") == (tmp_path / "envs" / "data.yaml").resolve()
    assert rules["a"].path_of("script") == (tmp_path / "scripts" / "a.py").resolve()
    assert "conda" not in rules["b"].directives and "shell" in rules["b"].directives
    assert set(rules["target"].directives) == {"input"}
    assert rules["c"].base == "a" and "torch" in rules["c"].directives["conda"]


def test_load_env_flags_unpinned(tmp_path):
    env = tmp_path / "e.yaml"
    env.write_text(
        "channels: [conda-forge, nodefaults]\n"
        "dependencies:\n  - python=3.11.11\n  - numpy\n  - scipy>=1.11\n  - pip=25.1\n"
        "  - pip:\n    - openslide-bin==4.0.1.2\n    - tqdm\n"
    )
    parsed = load_env(env)
    assert parsed.conda == {"python": "3.11.11", "pip": "25.1"}
    assert parsed.pip == {"openslide-bin": "4.0.1.2"}
    assert parsed.unpinned == ["numpy", "scipy>=1.11", "pip: tqdm"]


# -- tests: the real workflow and envs ----------------------------------------------------------
def test_workflow_has_code_rules():
    names = {r.name for r in code_rules()}
    assert {"train", "evaluate"} <= names, f"parser found only {sorted(names)}"


def test_every_code_rule_names_an_existing_env():
    problems = []
    for rule in code_rules():
        env = rule.path_of("conda")
        if env is None:
            problems.append(f"{rule.where()} runs code but has no `conda:` directive")
        elif not env.is_file():
            problems.append(f"{rule.where()}: conda env {env} does not exist")
        elif env.parent != ENV_DIR.resolve() or env == IMPORT_MAP.resolve():
            problems.append(f"{rule.where()}: conda env {env} is not an env of {ENV_DIR}")
    assert not problems, "\n".join(problems)


def test_run_rules_have_no_conda():
    bad = [r.where() for r in all_rules() if "run" in r.directives and "conda" in r.directives]
    assert not bad, f"Snakemake rejects `conda:` with `run:`: {bad}"


def test_every_env_is_used():
    used = {r.path_of("conda") for r in code_rules() if "conda" in r.directives}
    unused = [str(p.relative_to(REPO)) for p in env_files() if p.resolve() not in used]
    assert not unused, f"env files that no rule names: {unused}"


@pytest.mark.parametrize("path", env_files(), ids=lambda p: p.name)
def test_env_is_pinned_conda_forge(path):
    env = load_env(path)
    assert env.channels == CHANNELS, f"{path.name}: channels {env.channels}, want {CHANNELS}"
    assert not env.unpinned, f"{path.name}: not pinned as name=x.y.z: {env.unpinned}"
    assert "python" in env.conda, f"{path.name}: no python pin (the scripts run in it)"
    if env.pip:
        assert "pip" in env.conda, f"{path.name}: has a pip: section but no pinned pip"


def test_pins_satisfy_pyproject_and_agree_across_envs():
    reqs, requires_python = pyproject()
    _, pypi = load_import_map()
    problems, pins = [], {}
    for path in env_files():
        env = load_env(path)
        for name, version in env.packages.items():
            pins.setdefault(name, {})[path.name] = version
            if name == "python":
                spec = requires_python
            else:
                spec = reqs.get(pypi.get(name, name))
            if spec is not None and not spec.contains(Version(version), prereleases=True):
                problems.append(f"{path.name}: {name}={version} violates pyproject.toml {spec}")
    for name, by_env in pins.items():
        if len(set(by_env.values())) > 1:
            problems.append(f"{name} is pinned differently across envs: {by_env}")
    assert not problems, "\n".join(problems)


def test_import_map_covers_the_package():
    """Every third-party module imported anywhere in the package has a map entry."""
    imports, _ = load_import_map()
    walker = ImportWalker()
    unmapped = set()
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        found, _ = walker.third_party(path)
        unmapped |= {f"{t.name} ({t.where})" for t in found if t.name not in imports}
    assert not unmapped, f"add these imports to {IMPORT_MAP.name}: {sorted(unmapped)}"


def test_scripts_import_the_installed_package():
    """No script puts ``src/`` on ``sys.path``: that works in a clone only, not in a workflow
    deployed as a module. The package comes installed (pip, or the envs' post-deploy scripts)."""
    problems = []
    files = workflow_files()
    for rule in code_rules():
        script = rule.path_of("script")
        if rule.file not in files or script is None or not script.is_file():
            continue
        if re.search(r"sys\.path\.(insert|append)", script.read_text()):
            problems.append(f"{rule.where()}: {script.name} edits sys.path")
    for smk in files:
        if re.search(r"sys\.path\.(insert|append)", smk.read_text()):
            problems.append(f"{smk.relative_to(REPO)} edits sys.path")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", env_files(), ids=lambda p: p.name)
def test_env_installs_the_package_after_it_is_built(path):
    """``{env}.post-deploy.sh`` (run by Snakemake inside the new env) pip-installs omniseg, without
    dependencies, from OMNISEG_PACKAGE_SOURCE, which common.smk sets from workflow.basedir."""
    script = path.with_name(path.stem + ".post-deploy.sh")
    assert script.is_file(), f"{path.name}: no {script.name}"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "OMNISEG_PACKAGE_SOURCE" in text and "pip install --no-deps" in text
    env = load_env(path)
    assert {"pip", "setuptools"} <= set(env.conda), f"{path.name}: pip and setuptools build it"
    common = (WORKFLOW / "rules" / "common.smk").read_text()
    assert re.search(r'os\.environ\.setdefault\(\s*"OMNISEG_PACKAGE_SOURCE"', common)


def load_conda_forge_versions() -> tuple[str, dict[str, set[str]]]:
    """(date checked, conda package -> versions known on conda-forge)."""
    text = CONDA_FORGE_VERSIONS.read_text()
    checked = re.search(r"^# checked: (\d{4}-\d{2}-\d{2})$", text, re.M)
    assert checked, f"{CONDA_FORGE_VERSIONS.name}: no '# checked: YYYY-MM-DD' line"
    rows = [ln.split("\t") for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert rows[0] == ["package", "feedstock", "versions"], rows[0]
    known = {}
    for name, feedstock, versions in rows[1:]:
        assert feedstock.startswith("conda-forge/") and feedstock.endswith("-feedstock")
        known[canonicalize_name(name)] = set(versions.split(","))
    return checked[1], known


def test_known_versions_file_parses():
    checked, known = load_conda_forge_versions()
    assert checked >= "2026-12-01"
    assert {"python", "pytorch", "openslide", "openslide-python", "kornia"} <= set(known)


def test_load_conda_forge_versions_flags_a_pin_it_lacks(tmp_path, monkeypatch):
    """The check below on a hand-written list: kornia 0.9.0 (needs kornia-rs >= 0.2) is not there."""
    listing = tmp_path / "versions.tsv"
    listing.write_text(
        "# checked: 2026-12-01\npackage\tfeedstock\tversions\n"
        "kornia\tconda-forge/kornia-feedstock\t0.8.1,0.8.2\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "CONDA_FORGE_VERSIONS", listing)
    _, known = load_conda_forge_versions()
    assert "0.9.0" not in known["kornia"] and "0.8.2" in known["kornia"]


@pytest.mark.parametrize("path", env_files(), ids=lambda p: p.name)
def test_every_pin_is_a_version_conda_forge_has(path):
    _, known = load_conda_forge_versions()
    env = load_env(path)
    problems = [
        f"{name}={version}" + ("" if name in known else " (package not in the list)")
        for name, version in env.conda.items()
        if version not in known.get(name, set())
    ]
    assert not problems, (
        f"{path.name}: pins conda-forge does not have (per {CONDA_FORGE_VERSIONS.name}, read "
        f"from the feedstocks): {problems}"
    )
    assert not env.pip, f"{path.name}: pip-only packages {sorted(env.pip)}; use conda-forge's"


def test_data_env_needs_no_pytorch():
    """The data rules never import torch (followed statically above, and checked at run time)."""
    import subprocess

    env = load_env(ENV_DIR / "data.yaml")
    assert "pytorch" not in env.conda
    code = (
        "import sys; import omniseg.steps.rois, omniseg.data.patches, omniseg.data.patchset, "
        "omniseg.data.release, omniseg.synthetic.cohort, omniseg.figures, omniseg.tables; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_every_rule_env_provides_its_imports():
    imports, pypi = load_import_map()
    reqs, _ = pyproject()
    walker = ImportWalker()
    problems = []
    checked = 0
    for rule in code_rules():
        script = rule.path_of("script")
        env_path = rule.path_of("conda")
        if script is None or env_path is None or not env_path.is_file():
            continue  # shell rules; a missing env is reported by its own test
        if not script.is_file():
            problems.append(f"{rule.where()}: script {script} does not exist")
            continue
        env = load_env(env_path)
        found, missing = walker.third_party(script)
        problems += [f"{rule.where()}: {script.name} reaches missing module {m}" for m in missing]
        for tp in found:
            if tp.name not in imports:
                problems.append(
                    f"{rule.where()}: `import {tp.name}` ({tp.where}) has no entry in "
                    f"{IMPORT_MAP.relative_to(REPO)}"
                )
                continue
            for package in imports[tp.name]:
                if package not in env.packages:
                    problems.append(
                        f"{rule.where()} uses env {env_path.name}, but its script "
                        f"{script.name} reaches `import {tp.name}` at {tp.where} "
                        f"(via {' -> '.join(tp.chain)}): package {package!r} is missing "
                        f"from {env_path.name}"
                    )
                elif pypi.get(package, package) not in reqs:
                    problems.append(
                        f"{rule.where()}: `import {tp.name}` at {tp.where} needs {package!r}, "
                        f"which pyproject.toml does not declare"
                    )
        checked += 1
    assert checked, "no script rule with an env was checked"
    assert not problems, "\n".join(sorted(set(problems)))


def test_envs_are_minimal():
    """Every package of an env is needed by a rule that uses it (python, pip and setuptools, which
    install the package, excepted)."""
    imports, _ = load_import_map()
    walker = ImportWalker()
    needed: dict[Path, set[str]] = {}
    for rule in code_rules():
        script, env_path = rule.path_of("script"), rule.path_of("conda")
        if env_path is None:
            continue
        names = needed.setdefault(env_path, set())
        if script is None or not script.is_file():
            names.add("*")  # a shell rule: what it runs is not analysed, keep the whole env
            continue
        found, _ = walker.third_party(script)
        names |= {p for t in found for p in imports.get(t.name, [])}
    problems = []
    for path in env_files():
        names = needed.get(path.resolve(), set())
        if "*" in names:
            continue
        extra = sorted(set(load_env(path).packages) - names - {"python", "pip", "setuptools"})
        if extra:
            problems.append(f"{path.name}: no rule using it imports {extra}; remove them")
    assert not problems, "\n".join(problems)
