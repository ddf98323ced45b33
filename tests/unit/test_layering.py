"""The import layering of `engine/`, read from the source (every import, at module level or inside a function).

- `engine/rl/` is the pure math: it imports torch, the standard library and its own modules, nothing else
  (not even the rest of `engine`), so it can be read and tested alone.
- `engine` never imports a step, a benchmark, a test or a top-level script.
- No two engine modules import each other, however indirectly and however lazily: a lazy import only
  hides a cycle, it does not remove it.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"
NOT_ENGINE = ("step1_sft", "step2_reward", "step3_rlhf", "benchmarks", "tests", "e2e_rlhf", "chat")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute, anywhere in the file."""
    out: set[str] = set()
    package = ""
    if path.is_relative_to(ROOT):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: drop level - 1 trailing parts of the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}  # `from engine.x import module`
    return out


def engine_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ENGINE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def allowed_in_rl(name: str) -> bool:
    """May a module of `engine/rl/` import `name`? torch, the standard library and `engine.rl` itself."""
    top = name.split(".")[0]
    return (top in ("torch", "__future__") or top in sys.stdlib_module_names
            or name == "engine.rl" or name.startswith("engine.rl."))


def test_rl_imports_only_torch_and_the_standard_library():
    for path in sorted((ENGINE / "rl").rglob("*.py")):
        for name in imports_of(path):
            assert allowed_in_rl(name), f"{path.name} imports {name}"


@pytest.mark.parametrize("name, allowed", [
    ("torch.nn.functional", True), ("math", True), ("engine.rl.ppo", True), ("engine.rl", True),
    ("engine", False), ("engine.config", False), ("engine.rlx", False), ("numpy", False), ("deepspeed", False),
])
def test_the_rl_rule_can_fail(name, allowed):
    assert allowed_in_rl(name) == allowed


def test_engine_never_imports_a_step_a_benchmark_or_a_test():
    for path in sorted(ENGINE.rglob("*.py")):
        bad = {m for m in imports_of(path) if m.split(".")[0] in NOT_ENGINE}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_engine_has_no_import_cycle():
    cycle = find_cycle(engine_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a.b"}, "a.b": set()}, False),
])
def test_the_cycle_finder_can_fail(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic


def test_the_import_reader_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from engine.config import X\n    import torch.nn\n")
    assert {"engine.config", "engine.config.X", "torch.nn"} <= imports_of(f)
