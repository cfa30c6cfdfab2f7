"""The layout shows the pipeline: each asset's logic sits in a stage module of the same name,
imports only point down (ops → stages → core), and modules stay small enough to read."""

import ast
import functools
import gc
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
ASSETS = sorted(p.stem for p in (PROJECT / "assets").glob("*.py") if p.stem != "__init__")
MAX_LINES = 400  # a guard: a module past it likely holds two concerns


@functools.cache
def _all_parsed() -> dict[Path, ast.Module]:
    """Every module parsed once, with the garbage collector held off: on CPython 3.11 a finaliser that
    runs during a parse (an earlier test's pooled SQLite connection being reset) raises "SystemError:
    AST constructor recursion depth mismatch" (CPython gh-106905), as CI once saw. One collection
    before all of them: one per file, late in the session with a large heap, took minutes."""
    files = [p for folder in ("pipeline", "assets", "resources") for p in sorted((PROJECT / folder).rglob("*.py"))]
    gc.collect()
    gc.disable()
    try:
        return {p: ast.parse(p.read_text()) for p in files}
    finally:
        gc.enable()


def parse(path: Path) -> ast.Module:
    return _all_parsed()[path]


def imports(path: Path) -> set[str]:
    tree = parse(path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def modules(folder: str) -> list[Path]:
    return sorted((PROJECT / folder).rglob("*.py"))


@pytest.mark.parametrize("name", ASSETS)
def test_every_asset_has_a_stage_of_its_name(name):
    stage = PROJECT / "pipeline" / "stages"
    assert (stage / f"{name}.py").is_file() or (stage / name / "__init__.py").is_file(), (
        f"assets/{name}.py has no pipeline/stages/{name}.py or pipeline/stages/{name}/"
    )
    assert any(m.startswith(f"pipeline.stages.{name}") for m in imports(PROJECT / "assets" / f"{name}.py")), (
        f"assets/{name}.py does not use its stage"
    )


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("pipeline/core", ("pipeline.stages", "pipeline.ops", "pipeline.definitions", "assets", "dagster")),
        ("pipeline/stages", ("pipeline.ops", "pipeline.definitions", "assets", "dagster.")),
        ("assets", ("pipeline.ops", "pipeline.definitions")),
    ],
)
def test_imports_only_point_down(folder, forbidden):
    wrong = [
        f"{p.relative_to(PROJECT)} imports {m}"
        for p in modules(folder)
        for m in sorted(imports(p))
        if any(m == f.rstrip(".") or m.startswith(f if f.endswith(".") else f + ".") for f in forbidden)
    ]
    assert not wrong, wrong


def stage_of(path: Path) -> str:
    """``pipeline/stages/<name>.py`` or ``pipeline/stages/<name>/...``: the stage's (and asset's) name."""
    return path.relative_to(PROJECT / "pipeline" / "stages").parts[0].removesuffix(".py")


def test_a_stage_imports_only_the_stages_upstream_of_it():
    """Imports follow the data: a stage may use what an upstream asset's stage provides, never a
    downstream or sibling stage's (the asset graph says which are upstream)."""
    from dagster import AssetKey

    from pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    upstream = {
        key.to_user_string(): {k.to_user_string() for k in graph.upstream_key_iterator(key)}
        for key in graph.get_all_asset_keys()
    }
    wrong = []
    for path in modules("pipeline/stages"):
        if path.name == "__init__.py" and path.parent.name == "stages":
            continue
        stage = stage_of(path)
        allowed = upstream.get(stage, set()) | {stage}
        for name in imports(path):
            if name.startswith("pipeline.stages."):
                used = name.split(".")[2]
                if used not in allowed:
                    wrong.append(f"{path.relative_to(PROJECT)} imports {used}, not upstream of {stage}")
    assert AssetKey("lora_adapter") in graph.get_all_asset_keys() and not wrong, wrong


def test_no_private_name_is_imported_from_another_module():
    taken = []
    for path in modules("pipeline") + modules("assets") + modules("resources"):
        for node in ast.walk(parse(path)):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in ("pipeline", "assets", "resources")
            ):
                taken += [
                    f"{path.relative_to(PROJECT)}: {a.name} from {node.module}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not taken, taken


def test_stages_run_without_dagster():
    """Stage modules may use dagster_pipes (the training child's channel), never Dagster itself."""
    wrong = [f"{p.relative_to(PROJECT)}" for p in modules("pipeline/stages") if "dagster" in imports(p)]
    assert not wrong, wrong


def test_loading_the_code_location_imports_no_heavy_library():
    """Every Dagster process (the CLI, the code server, each run, the daemon) loads the definitions:
    torch, transformers, peft, MLflow, Great Expectations and scipy are imported where they are used
    (about 2 s less at each process start than with torch and datasketch imported up front)."""
    heavy = (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "mlflow",
        "great_expectations",
        "scipy",
        "datasketch",
        "matplotlib",
        "datasets",
    )
    code = f"import sys, pipeline.definitions; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"pipeline.definitions imports {out}"


def test_modules_stay_readable():
    """No module above 400 lines unless its opening says why it reads better whole."""
    long = []
    for folder in ("pipeline", "assets", "resources"):
        for p in modules(folder):
            n = len(p.read_text().splitlines())
            doc = ast.get_docstring(parse(p)) or ""
            if n > MAX_LINES and "reads better whole" not in doc:
                long.append(f"{p.relative_to(PROJECT)}: {n} lines")
    assert not long, long


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_a_screen_unless_it_says_why():
    """Functions of ``pipeline/``, ``assets/`` and ``resources/`` stay within 80 lines, or their
    docstring says why they read better whole."""
    long = []
    for path, tree in _all_parsed().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            ):
                if "reads better whole" not in (ast.get_docstring(node) or "").lower():
                    long.append(f"{path.relative_to(PROJECT)}::{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_every_setting_is_declared_once_with_a_description():
    """An asset's Config is its stage's settings class where the stage has one (no field declared
    again, so no default copied), and every setting says what it does (the UI and the docs show it)."""
    from assets.evaluation_report import EvaluationReportConfig
    from assets.lora_adapter import LoraAdapterConfig
    from assets.validated_records import ValidatedRecordsConfig
    from pipeline.ops.settings_doc import ASSET_ORDER, config_class
    from pipeline.stages.evaluation_report.settings import EvaluationSettings
    from pipeline.stages.lora_adapter.spec import TrainingSettings, TrainSpec
    from pipeline.stages.validated_records import Bounds

    for config, settings in (
        (LoraAdapterConfig, TrainingSettings),
        (EvaluationReportConfig, EvaluationSettings),
        (ValidatedRecordsConfig, Bounds),
    ):
        assert issubclass(config, settings)
        again = set(config.__dict__.get("__annotations__", {})) & set(settings.model_fields)
        assert not again, f"{config.__name__} declares {sorted(again)} again"
    assert issubclass(TrainSpec, TrainingSettings)  # the child's spec: the same declarations, plus paths
    assert "max_seq_len" not in LoraAdapterConfig.model_fields  # the rows' length is the tokenized dataset's alone
    undescribed = [
        f"{a}.{name}" for a in ASSET_ORDER for name, f in config_class(a).model_fields.items() if not f.description
    ]
    assert not undescribed, undescribed


@pytest.mark.parametrize(
    "target, installs", [("run", False), ("serve", False), ("setup", False), ("test", True), ("screenshots", True)]
)
def test_only_the_browser_and_database_targets_install_system_packages(target, installs):
    """`make run` (and setup, serve) install Python packages only; make test and make screenshots
    install Chromium (and PostgreSQL) when missing. A dry run on a machine without them says which."""
    import subprocess

    plan = subprocess.run(
        ["make", "-n", "-B", target, "CHROMIUM=/nonexistent/chromium", "PYTHON=python3"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ("apt-get" in plan) is installs, plan
