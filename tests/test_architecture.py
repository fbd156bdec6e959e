"""The package's layers (docs/architecture.md): every import runs down or sideways, never up."""

import ast
import pathlib

import jaxalign

PACKAGE = pathlib.Path(jaxalign.__file__).parent

# Bottom to top. A module may import modules of its own layer or of layers below it.
LAYERS = [
    (
        "foundations",
        [
            "jaxalign.validation",
            "jaxalign.parallel",
            "jaxalign.throughput",
            "jaxalign.tokenizer",
            "jaxalign.losses",
            "jaxalign.instructions",
            "jaxalign.judging",
            "jaxalign.checkpoint",
            "jaxalign.report",
            "jaxalign.model_card",
            "jaxalign.validation",
            "jaxalign.instructions",
            "jaxalign.data",
        ],
    ),
    ("models", ["jaxalign.models"]),
    ("weights", ["jaxalign.weights"]),
    ("loading", ["jaxalign.loading", "jaxalign.tiny_model"]),
    (
        "numerics",
        ["jaxalign.training", "jaxalign.sampling", "jaxalign.refinement", "jaxalign.enhancement"],
    ),
    ("config", ["jaxalign.config"]),
    (
        "services",
        [
            "jaxalign.scoring",
            "jaxalign.loop",
            "jaxalign.generation",
            "jaxalign.reward_judge",
            "jaxalign.evaluation",
        ],
    ),
    ("algorithms", ["jaxalign.algorithms"]),
    ("cli", ["jaxalign.cli", "jaxalign.__main__", "jaxalign"]),
]
ALGORITHMS = ("jaxalign.algorithms.spa", "jaxalign.algorithms.ple", "jaxalign.algorithms.dpo")
# `jaxalign.models.load` is kept for users as a name for `jaxalign.loading.load`, resolved
# on first use (models/__init__.py's __getattr__); the package itself never goes that way.
ALLOWED_UPWARD = {("jaxalign.models", "jaxalign.loading")}


def _module_names():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("jaxalign", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """The jaxalign modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxalign"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in known} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jaxalign")}
    return found


def _layer(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer of docs/architecture.md; place it"
    return best[0]


def test_every_import_runs_down_or_sideways():
    modules = dict(_module_names())
    known = set(modules)
    upward = []
    for name, path in modules.items():
        for dep in _imports(path, known):
            if (name, dep) not in ALLOWED_UPWARD and _layer(dep) > _layer(name):
                upward.append(
                    f"{name} ({LAYERS[_layer(name)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})"
                )
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_algorithm_imports_another():
    """SPA, PLE and DPO share the service modules and algorithms/{rounds,stages}.py, not code
    of one another."""
    modules = dict(_module_names())
    known = set(modules)
    for name in ALGORITHMS:
        others = _imports(modules[name], known) & (set(ALGORITHMS) - {name})
        assert not others, f"{name} imports {others}"


def test_model_definitions_read_no_files():
    """models/ defines modules only: no weights, no loading, no judges."""
    modules = dict(_module_names())
    known = set(modules)
    for name, path in modules.items():
        if name.startswith("jaxalign.models."):
            assert _imports(path, known) <= {"jaxalign.models.llama"}, name


def test_the_traced_round_names_real_functions():
    """Every ``module.function`` in docs/architecture.md's trace exists (the doc cannot rot)."""
    import importlib
    import re

    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    trace = doc.split("```")[1]
    short = {n: f"jaxalign.algorithms.{n}" for n in ("spa", "ple", "dpo", "stages", "rounds")}
    classes = {"RoundRunner": "jaxalign.algorithms.rounds", "Transformer": "jaxalign.models.llama"}
    checked = 0
    for token in sorted(set(re.findall(r"\b([\w/]+(?:\.\w+)+)", trace))):
        head, *attrs = token.split(".")
        if head in classes:
            module, attrs = classes[head], [head, *attrs]
        else:
            module = short.get(head, "jaxalign." + head.replace("/", "."))
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError:
            continue  # a file name (state.json), a config key (run.checkpoint_every), ...
        for attr in attrs:
            assert hasattr(obj, attr), f"docs/architecture.md names {token}, which does not exist"
            obj = getattr(obj, attr)
        checked += 1
    assert checked > 40
