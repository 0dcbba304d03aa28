"""The architecture's rules, checked on the source: dependencies point down, files stay small, docs stay inside.

docs/DESIGN.md states the layering: proto at the bottom, config on it (for the modulation set), then the learning
core (fedlora), then the PHY (phy) and the link layer (link), then the nodes (bs_node, edge_node), then the
launcher, then the sweep on top. A package may import its own layer and the ones below, never one above.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {
    "proto": 0,
    "config": 1,
    "fedlora": 2,
    "trust": 2,
    "phy": 3,
    "link": 4,
    "bs_node": 5,
    "edge_node": 5,
    "calibration": 5,
    "launcher": 6,
    "sweep": 7,
}
MAX_LINES = 400


def _sources() -> list[Path]:
    return sorted(p for pkg in LAYER for p in (REPO / pkg).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, wherever in the file (lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_package_imports_only_its_layer_and_below() -> None:
    upward = []
    for path in _sources():
        package = path.relative_to(REPO).parts[0]
        for module in _imports(path):
            top = module.split(".")[0]
            if top in LAYER and top != package and LAYER[top] > LAYER[package]:
                upward.append(f"{path.relative_to(REPO)} imports {module} ({top} is above {package})")
            if top in LAYER and LAYER[top] == LAYER[package] and top != package and package != "calibration":
                upward.append(f"{path.relative_to(REPO)} imports {module} (a sibling of {package})")
    assert not upward, "\n".join(upward)


def test_the_round_logic_imports_no_sockets() -> None:
    """The BS's round state machine and the edge's round run without zmq, through everything they import."""
    code = "import sys, bs_node.rounds.runner, edge_node.round\nprint('zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "importing the round logic loaded zmq"


@pytest.mark.parametrize("tree", [*LAYER, "benchmarks", "scripts"])
def test_no_source_file_is_over_the_limit(tree: str) -> None:
    long = [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in sorted((REPO / tree).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def test_config_and_protocol_load_neither_torch_nor_gnuradio() -> None:
    """The air process and the config tools must stay light: the wire formats and the config are pure Python."""
    code = (
        "import sys, config, proto.control, proto.framing, proto.numerology, proto.air\n"
        "heavy = sorted(m for m in ('torch', 'gnuradio', 'transformers', 'zmq') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing config/proto loaded {out.stdout.strip()}"


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in listed if f.endswith((".py", ".md", ".yaml", ".toml", ".sh", ".cfg", ".txt"))]


def test_no_file_cites_a_path_outside_the_repository() -> None:
    outside = re.compile(r"(\.\./shared|/work/shared|\.\./\.\./|shared/notes|shared/seeds)")
    hits = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()}"
        for p in _tracked_text_files()
        if p.exists()
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line) and p.name != "test_architecture.py"
    ]
    assert not hits, "\n".join(hits)


def test_every_docs_path_cited_in_readme_and_code_exists() -> None:
    """Every docs/*.md reference (with or without a § section) resolves inside the repository."""
    cited = re.compile(r"docs/[A-Za-z0-9_.-]+\.md")
    missing = sorted(
        {
            f"{p.relative_to(REPO)} cites {m}"
            for p in _tracked_text_files()
            if p.exists()
            for m in cited.findall(p.read_text(errors="replace"))
            if not (REPO / m).exists()
        }
    )
    assert not missing, "\n".join(missing)


def test_pitfall_citations_name_a_section_that_exists() -> None:
    sections = set(re.findall(r"^### (\d+)\.", (REPO / "docs" / "pitfalls.md").read_text(), re.M))
    cite = re.compile(r"pitfalls\.md`? §(\d+)")
    bad = [
        f"{p.relative_to(REPO)}: §{n}"
        for p in _tracked_text_files()
        if p.exists()
        for n in cite.findall(p.read_text(errors="replace"))
        if n not in sections
    ]
    assert not bad, "\n".join(bad)
    stale = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _tracked_text_files()
        if p.exists() and p.suffix == ".py"
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if re.search(r"\bpitfall \d", line)
    ]
    assert not stale, "bare 'pitfall N' references (cite docs/pitfalls.md §N):\n" + "\n".join(stale)
