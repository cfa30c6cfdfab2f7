"""Write the settings reference in ``docs/configuration.md`` from the settings' one declaration:
``python -m pipeline.ops.settings_doc`` (``make docs``; ``--check`` says whether it is current).

Each asset's Dagster ``Config`` (the stage's settings class where the stage has one, e.g.
``TrainingSettings``, ``EvaluationSettings``) and the ``data_root`` resource give a table: name,
type, default, bounds and description, read from the pydantic fields. Only the part between the
two markers is rewritten; the prose around it is the page's own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
import typing
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
BEGIN = "<!-- settings: written by `python -m pipeline.ops.settings_doc` from the declarations; edit those -->"
END = "<!-- end of settings -->"
# assets in the order data flows; each module's Config subclass is its run config
ASSET_ORDER = (
    "validated_records",
    "deduplicated_records",
    "alpaca_dataset",
    "base_model",
    "tokenized_dataset",
    "lora_adapter",
    "evaluation_report",
    "merged_model",
    "registered_model",
    "sweep_plan",
)
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}  # annotated_types' Gt, Ge, Lt, Le


def config_class(asset: str):
    from dagster import Config

    module = importlib.import_module(f"assets.{asset}")
    found = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, Config) and v.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise LookupError(f"assets/{asset}.py: expected one Config class, found {[c.__name__ for c in found]}")
    return found[0]


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or none" if type(None) in args else "")
    if origin in (list, tuple, dict):
        return f"{origin.__name__} of " + ", ".join(type_name(a) for a in args if a is not Ellipsis)
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.default_factory is not None:
        return (
            "(from the environment)"
            if field.default_factory.__name__.startswith("default")
            else f"`{field.default_factory()!r}`"
        )
    if field.is_required():
        return "(required)"
    return "none" if field.default is None else f"`{field.default!r}`".replace("|", "\\|")


def bounds_text(field) -> str:
    return ", ".join(
        f"{sign} {getattr(m, key)}"
        for m in field.metadata
        for key, sign in BOUNDS.items()
        if getattr(m, key, None) is not None
    )


def table(cls) -> list[str]:
    lines = ["| setting | type | default | bounds | what it does |", "|---|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        lines.append(
            f"| `{name}` | {type_name(field.annotation)} | {default_text(field)} | {bounds_text(field)} | "
            f"{description} |"
        )
    return lines


def declared_in(cls) -> str:
    """Where a newcomer finds the declarations: each class of the project that declares some of them."""
    places = [
        b
        for b in reversed(cls.__mro__)
        if b.__module__.startswith(("pipeline.", "assets.")) and b.__dict__.get("__annotations__")
    ]
    return " and ".join(f"`{source_path(b)}` (`{b.__name__}`)" for b in places)


def source_path(cls: type) -> str:
    """The file that declares ``cls``, relative to the project."""
    import inspect

    return Path(inspect.getfile(cls)).resolve().relative_to(DOC.parents[1]).as_posix()


def reference() -> str:
    from resources.data_root import DataRoot

    out = [BEGIN, ""]
    for asset in ASSET_ORDER:
        cls = config_class(asset)
        out += [f"### `{asset}`", "", f"Declared in {declared_in(cls)}.", "", *table(cls), ""]
    fields = {k: v for k, v in DataRoot.model_fields.items() if k != "path"}
    resource = types.SimpleNamespace(model_fields=fields)
    out += [
        "### resource `data_root`",
        "",
        "Declared in `resources/data_root.py` (`DataRoot`); its `path` is `MEDTUNE_DATA_DIR`.",
        "",
    ]
    out += [*table(resource), "", END]
    return "\n".join(out)


def rewritten(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    return head + reference() + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is not current")
    args = ap.parse_args(argv)
    current = DOC.read_text()
    wanted = rewritten(current)
    if args.check:
        if wanted != current:
            print(f"{DOC} is not current: run `python -m pipeline.ops.settings_doc`", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        DOC.write_text(wanted)
        print(f"wrote the settings reference in {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
