"""The FAVOR+ model code written next to a checkpoint, for ``from_pretrained(..., trust_remote_code=True)``.

transformers loads a checkpoint's custom code as a flat set of modules in the checkpoint folder
that import each other relatively (``from .x import y``), and finds its classes through
``config.json``'s ``auto_map``.  The exported modules are not a second implementation: each is
one of this package's own source files, copied verbatim except for its imports
(``from hf_performer.favor.features import`` becomes ``from .performer_favor_features import``).
The math a checkpoint ships is therefore exactly the math that was tested, and the exported
files never import ``hf_performer``.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from hf_performer.config import __version__
from hf_performer.integration.attention import favor_attention_forward
from hf_performer.models.base import Family

ENTRY_MODULE = "modeling_performer"
"""The exported module that ``auto_map`` names; importing it registers the ``"favor+"`` functions."""

_PACKAGE = "hf_performer"
_PACKAGE_IMPORT = re.compile(r"^(\s*)from hf_performer((?:\.\w+)+) import", re.MULTILINE)

_ENTRY_SOURCE = '''# Exported by hf-performer {version}; re-export the checkpoint instead of editing this file.
"""FAVOR+ (Performer) code of this checkpoint, for ``from_pretrained(..., trust_remote_code=True)``.

Importing this module registers the ``"favor+"`` attention and mask functions with transformers;
the ``auto_map`` of config.json points the Auto classes at the classes re-exported here.  The
``performer_*.py`` files next to it are hf-performer's own modules with their imports made
relative.  With hf-performer installed, ``import hf_performer`` loads this checkpoint without
this code.
"""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .{attention_module} import ATTENTION_NAME, favor_attention_forward, favor_mask
from .{family_module} import (
{class_imports}
)

__all__ = [
{class_names}
]

AttentionInterface.register(ATTENTION_NAME, favor_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, favor_mask)
'''


def exported_name(module: str) -> str:
    """The flat module name of a package module: ``hf_performer.favor.features`` → ``performer_favor_features``."""
    return "performer_" + module.removeprefix(f"{_PACKAGE}.").replace(".", "_")


def _source_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or spec.submodule_search_locations is not None:
        raise ValueError(f"cannot export {module!r}: remote code is flat, so only plain modules can be imported")
    return Path(spec.origin)


def _package_imports(module: str, source: str) -> list[str]:
    """The ``hf_performer`` modules that ``module`` imports; refuses import forms that cannot be made relative."""
    imported = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == _PACKAGE for alias in node.names):
            raise ValueError(f"{module} uses `import {_PACKAGE}...`; write `from {_PACKAGE}.<module> import <name>`")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"{module} uses a relative import; write `from {_PACKAGE}.<module> import <name>`")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == _PACKAGE:
            if node.module == _PACKAGE:
                raise ValueError(f"{module} imports from the package root; import from the defining module")
            imported.append(node.module)
    return imported


def exported_sources(roots: list[str]) -> dict[str, str]:
    """``roots`` and every package module they need, as ``{exported module name: source}``."""
    package_root = Path(importlib.util.find_spec(_PACKAGE).origin).parent
    sources: dict[str, str] = {}
    pending = list(roots)
    while pending:
        module = pending.pop()
        name = exported_name(module)
        if name in sources:
            continue
        path = _source_file(module)
        source = path.read_text(encoding="utf-8")
        pending.extend(_package_imports(module, source))
        relative = _PACKAGE_IMPORT.sub(lambda m: f"{m[1]}from .{exported_name(_PACKAGE + m[2])} import", source)
        origin = path.relative_to(package_root).as_posix()
        sources[name] = f"# Exported by hf-performer {__version__} from {_PACKAGE}/{origin}; do not edit.\n{relative}"
    return sources


def entry_source(family: Family) -> str:
    """The source of :data:`ENTRY_MODULE` for one family: registrations plus its config and model classes."""
    names = [family.config_class.__name__] + [head.performer_class.__name__ for head in family.heads]
    return _ENTRY_SOURCE.format(
        version=__version__,
        attention_module=exported_name(favor_attention_forward.__module__),
        family_module=exported_name(family.config_class.__module__),
        class_imports="\n".join(f"    {name}," for name in names),
        class_names="\n".join(f'    "{name}",' for name in names),
    )


def auto_map(family: Family) -> dict[str, str]:
    """config.json's ``auto_map``: every Auto class of the family → its class in :data:`ENTRY_MODULE`."""
    classes = {"AutoConfig": family.config_class} | {h.auto_class.__name__: h.performer_class for h in family.heads}
    return {auto: f"{ENTRY_MODULE}.{cls.__name__}" for auto, cls in classes.items()}


def write_remote_code(family: Family, folder: Path) -> list[str]:
    """Write the entry module and the package modules it needs into ``folder``; returns the file names."""
    sources = exported_sources([family.config_class.__module__, favor_attention_forward.__module__])
    sources[ENTRY_MODULE] = entry_source(family)
    for name, source in sources.items():
        (folder / f"{name}.py").write_text(source, encoding="utf-8")
    return sorted(f"{name}.py" for name in sources)
