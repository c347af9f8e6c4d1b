"""The dependency rule, read from the source: no import cycles among the project's modules;
``workers`` imports neither ``ray`` nor ``pipeline``; the modes in ``pipeline/`` share the
stages, not each other; the modules the torch-free Ray actors and drivers load import no torch.
Each check also runs on a made-up graph that breaks it, to show that it can fail."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("workers", "pipeline")
#: pipeline/<mode> may not import these other modes (the server is a front door over streaming;
#: the microphone script's --server mode uses the Vosk client, which is no part of the server)
MODES = {
    "pipeline.batch": ("pipeline.streaming", "pipeline.serve", "pipeline.training"),
    "pipeline.streaming": ("pipeline.batch", "pipeline.serve.app", "pipeline.serve.cli", "pipeline.serve.protocol",
                           "pipeline.training", "pipeline.bench"),
    "pipeline.serve": ("pipeline.batch", "pipeline.training"),
    "pipeline.training": ("pipeline.batch", "pipeline.streaming", "pipeline.serve", "pipeline.bench"),
}
#: loaded by the ingest and decoder actors and the stream driver, which never load torch
TORCH_FREE = (
    "workers.audio.checks", "workers.audio.ingest", "workers.audio.vad_gate", "workers.audio.endpoint",
    "workers.decoding.decoder", "workers.decoding.ctc_search", "workers.decoding.lm", "workers.decoding.stage",
    "workers.features.config", "workers.model.config", "workers.model.tokens", "workers.model.bundle_config",
    "workers.training.config", "pipeline.config", "pipeline.streaming", "pipeline.streaming.session",
    "pipeline.streaming.actors", "pipeline.serve.protocol", "pipeline.serve.client",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules (and external top-level packages) it imports anywhere in its body."""
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        name = module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules:
                    deps.add(target)
                elif target.split(".")[0] not in PACKAGES:
                    deps.add(target.split(".")[0])
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among the graph's own modules (a package importing its own submodules,
    as a re-export, does not count)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep not in graph or dep.startswith(node + "."):
                continue
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = [f"cycle: {' -> '.join(c)}" for c in cycles(graph)]
    for name, deps in graph.items():
        if name.startswith("workers"):
            out += [f"{name} imports {d}" for d in sorted(deps) if d == "ray" or d.startswith("pipeline")]
        for mode, others in MODES.items():
            if name == mode or name.startswith(mode + "."):
                out += [f"{name} (mode {mode}) imports {d}" for d in sorted(deps) if any(d == o or d.startswith(o + ".") for o in others)]
    return out


def test_the_project_keeps_the_dependency_rule() -> None:
    graph = import_graph()
    assert len(graph) > 60 and "workers.recognizer" in graph
    assert violations(graph) == []


def test_the_rule_catches_a_cycle_ray_in_workers_and_modes_importing_each_other() -> None:
    graph = {"workers.a": {"workers.b", "ray"}, "workers.b": {"workers.a"}, "pipeline.batch.job": {"pipeline.streaming.session"},
             "pipeline.streaming.session": {"workers.a"}, "workers.c": {"pipeline.config"}, "pipeline.config": set()}
    found = violations(graph)
    assert "cycle: workers.a -> workers.b -> workers.a" in found
    assert "workers.a imports ray" in found and "workers.c imports pipeline.config" in found
    assert "pipeline.batch.job (mode pipeline.batch) imports pipeline.streaming.session" in found


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_import_no_torch(module: str) -> None:
    code = f"import sys, {module}; bad = [m for m in ('torch', 'torchaudio') if m in sys.modules]; assert not bad, bad"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_public_api_is_lazy_and_complete() -> None:
    code = ("import sys, workers; assert 'torch' not in sys.modules; "
            "from workers import Recognizer, StreamingRecognizer, load_bundle, read_corpus, DecoderConfig, VadConfig; "
            "assert 'torch' in sys.modules and Recognizer.__module__ == 'workers.recognizer'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
