"""The package's layering: no import cycle (lazy imports inside functions included), and the lower
layers never import the ones above them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "dleaf_analysis"


def _graph() -> dict[str, set[str]]:
    mods: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(("dleaf_analysis",) + f.relative_to(ROOT).with_suffix("").parts).replace(".__init__", "")
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dleaf_analysis"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("dleaf_analysis")}
        mods[name] = deps
    return {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in graph[n]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[n] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_lower_layers_do_not_import_upper_ones():
    graph = _graph()
    upper = ("dleaf_analysis.evaluation", "dleaf_analysis.studies", "dleaf_analysis.report", "dleaf_analysis.figures",
             "dleaf_analysis.cli", "dleaf_analysis.model_card")
    for m, deps in graph.items():
        if m.startswith(("dleaf_analysis.scenes", "dleaf_analysis.models", "dleaf_analysis.hooks", "dleaf_analysis.lens",
                         "dleaf_analysis.diagnostics", "dleaf_analysis.tracing", "dleaf_analysis.interventions")):
            bad = sorted(d for d in deps if d.startswith(upper))
            assert not bad, f"{m} imports {bad}"


def test_image_sources_sit_below_the_studies():
    """Sources feed events, studies, tuning and figures; they never import those."""
    graph = _graph()
    upper = ("dleaf_analysis.studies", "dleaf_analysis.report", "dleaf_analysis.figures", "dleaf_analysis.cli",
             "dleaf_analysis.evaluation.runner", "dleaf_analysis.evaluation.tuning")
    for m, deps in graph.items():
        if m.startswith("dleaf_analysis.sources"):
            bad = sorted(d for d in deps if d.startswith(upper))
            assert not bad, f"{m} imports {bad}"


def test_figures_only_plot():
    """Figures plot tidy tables made by the studies and evaluation: they neither decode, trace nor
    intervene themselves."""
    compute = ("dleaf_analysis.tracing", "dleaf_analysis.interventions", "dleaf_analysis.hooks", "dleaf_analysis.lens",
               "dleaf_analysis.diagnostics", "dleaf_analysis.models.generation", "dleaf_analysis.evaluation.chair")
    deps = _graph()["dleaf_analysis.figures"]
    bad = sorted(d for d in deps if d.startswith(compute) or d in ("dleaf_analysis.models.caption",))
    assert not bad, f"dleaf_analysis.figures imports {bad}"


def test_no_private_imports_across_modules():
    """A module uses only the public names of another (``_private`` helpers stay in their module)."""
    bad = []
    for f in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dleaf_analysis"):
                bad += [f"{f.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
