"""The package's layering: no import cycle among gpt2rlhf's modules (function-level
imports included), and every module importable on its own."""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2rlhf"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the gpt2rlhf modules it imports}, from the source, wherever the import is."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps |= {c for c in candidates if c in modules and c != name}
        graph[name] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "gpt2rlhf.loading" in graph and "gpt2rlhf.hf" in graph["gpt2rlhf.loading"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_layers_import_downwards_only():
    graph = import_graph()
    assert not graph["gpt2rlhf.files"] - set()  # the readers know no other module of ours
    assert "gpt2rlhf.checkpoint" not in graph["gpt2rlhf.hf"] and "gpt2rlhf.loading" not in graph["gpt2rlhf.hf"]
    assert "gpt2rlhf.loading" not in graph["gpt2rlhf.checkpoint"]


def test_every_module_imports_on_its_own():
    def alone(name):
        res = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=PACKAGE.parent, capture_output=True,
                             text=True, timeout=120)
        return name, res.returncode, res.stderr[-500:]

    with ThreadPoolExecutor(2) as pool:
        failed = [r for r in pool.map(alone, sorted(import_graph())) if r[1] != 0]
    assert not failed, failed


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


LAYERS = {  # docs/architecture.md's table: a module imports only its own layer or lower ones
    0: {"model", "allocator", "files", "tokenizer", "rl", "losses", "tracking", "evaluation.judge"},
    1: {"lora", "generation", "config", "distributed"},
    2: {"hf", "checkpoint", "data"},
    3: {"runs"},
    4: {"loading"},
    5: {"stages", "stages.common", "stages.sft", "stages.rm", "stages.ppo", "stages.grpo", "stages.dpo", "rewards",
        "inspector", "chat", "serving", "evaluation",
        "evaluation.metrics",
        "evaluation.sentiment"},
}


def test_modules_import_only_their_layer_or_lower_ones_as_the_architecture_doc_says():
    layer_of = {f"gpt2rlhf.{m}": n for n, mods in LAYERS.items() for m in mods}
    graph = {k: v for k, v in import_graph().items() if k != "gpt2rlhf"}
    assert set(graph) == set(layer_of), set(graph) ^ set(layer_of)  # every module is in the table
    upward = [(m, d) for m, deps in graph.items() for d in deps if layer_of[d] > layer_of[m]]
    assert not upward, upward
    doc = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    for mods in LAYERS.values():
        for m in mods - {"stages", "evaluation"}:
            assert f"`{m.replace('.', '/')}.py`" in doc, m
