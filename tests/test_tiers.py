"""The package's tiers (README, "How it plugs into transformers"): each module imports only its own tier and those above."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_performer"

TIERS = [
    ["favor"],
    ["config", "positions"],
    ["integration"],
    ["models"],
    ["model_conversion", "patching"],
    ["export"],
    ["recovery", "cli", "gguf"],
]
TIER_OF = {name: level for level, names in enumerate(TIERS) for name in names}


def tier(module: str) -> int:
    """The tier of ``hf_performer.<top>...`` or of a file path relative to the package."""
    return TIER_OF[module.split(".")[0]]


def package_imports(path: Path) -> list[str]:
    imported = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_performer."):
            imported.append(node.module.removeprefix("hf_performer."))
    return imported


def test_every_module_belongs_to_a_tier():
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} == set(TIER_OF)


def test_imports_only_reach_the_same_tier_or_those_above():
    upward = [
        f"{path.relative_to(PACKAGE)} imports hf_performer.{module}"
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).as_posix() != "__init__.py"
        for module in package_imports(path)
        if tier(module) > tier(path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", "."))
    ]
    assert upward == []
