"""Every public attnax symbol must be on an API page.

The rule: for every public module ``M`` (:func:`public_modules`) and every name
``N`` in ``M.__all__``, an API page (``docs/api/``) has an entry for ``M.N``:
an autodoc directive (``autofunction``, ``autoclass``, ...) or a line of an
``autosummary`` table, written under ``M``'s ``currentmodule``. A name that is
itself a public module is also covered by that module's own page.

The rule is enforced twice, from one definition:

* Sphinx (``setup``): the entries actually rendered on ``api/`` pages are
  collected from the doctrees; ``env-check-consistency`` warns once per
  missing name, so ``sphinx-build -W`` fails.
* pytest (``tests/test_docs_api.py``): :func:`parse_api_pages` reads the page
  sources (``.rst`` or MyST ``.md``) without building anything.

The Sphinx side also resolves references to re-exported names
(``attnax.flash_attention``, ``attnax.kernels.causal_mod``) to the one place
where the object is documented in full, and warns about a reference to an
``attnax.*`` name that is not documented anywhere.

This module imports Sphinx only inside :func:`setup`, so the test needs no
docs dependencies.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import types
from pathlib import Path

PACKAGE = "attnax"

#: Modules that re-export another module's API under a second name.
MODULE_ALIASES = {"attnax.kernels.score_mods": "attnax.score_mods"}

#: Public-looking modules that get no API page of their own, and why.
NOT_API = {
    "attnax.demo": "the `python -m attnax.demo` script",
    **{alias: f"an alias of {target}, documented there" for alias, target in MODULE_ALIASES.items()},
}

_AUTODOC_ENTRIES = {
    "autofunction", "autoclass", "autoexception", "autodata", "autoattribute", "autodecorator",
    "automethod", "autoproperty", "autotype",
    "function", "class", "exception", "data", "attribute", "decorator", "method", "property", "type",
}  # fmt: skip
_MODULE_DECLARATIONS = {"automodule", "module"}
_DIRECTIVE = re.compile(
    r"^(?P<indent>[ \t]*)(?:\.\.[ \t]+(?:py:)?(?P<rst>[\w-]+)::"
    r"|(?P<fence>`{3,}|:{3,})\{(?:py:)?(?P<md>[\w-]+)\})[ \t]*(?P<arg>[^\s(]*)"
)
_CODE_FENCE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>\S*)")


def _is_private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def public_modules(package: str = PACKAGE) -> dict[str, types.ModuleType]:
    """The modules whose ``__all__`` the API pages must cover.

    Every importable module under ``package`` with no ``_``-prefixed component
    in its dotted name, except those in :data:`NOT_API`. New subpackages
    (``attnax.nn``, ``attnax.compat``, ...) are found without configuration.

    Raises:
        AttributeError: a public module without ``__all__``.
    """
    root = importlib.import_module(package)
    found = {package: root}
    for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
        if _is_private(info.name) or info.name in NOT_API:
            continue
        found[info.name] = importlib.import_module(info.name)
    for name, module in found.items():
        if not hasattr(module, "__all__"):
            raise AttributeError(
                f"public module `{name}` defines no `__all__`: add one (its API), give it a leading underscore "
                f"if it is private, or list it in NOT_API in {__file__}."
            )
    return dict(sorted(found.items()))


def required_names(modules: dict[str, types.ModuleType]) -> dict[str, object]:
    """``{"M.N": object}`` for every ``N`` in every public module's ``__all__``."""
    return {f"{m}.{n}": getattr(mod, n) for m, mod in modules.items() for n in mod.__all__}


def missing(documented: set[str], declared_modules: set[str], modules: dict[str, types.ModuleType]) -> list[str]:
    """What the API pages lack: public names without an entry, public modules without a page.

    Args:
        documented: fully qualified names that have an entry (autodoc or autosummary).
        declared_modules: modules that an API page declares (``automodule``/``module``).
        modules: :func:`public_modules`.

    Returns:
        One human-readable line per problem, sorted; empty when complete.
    """
    problems = [
        f"module `{m}` has no API page: add docs/api/{m}.rst (see docs/api/index.md)"
        for m in modules
        if m not in declared_modules
    ]
    for full, obj in required_names(modules).items():
        if full in documented:
            continue
        if isinstance(obj, types.ModuleType) and obj.__name__ in declared_modules | set(NOT_API):
            continue
        module, name = full.rsplit(".", 1)
        problems.append(f"`{full}` (in {module}.__all__) is on no API page: add `{name}` to docs/api/{module}.rst")
    return sorted(problems)


def parse_api_pages(api_dir: str | Path) -> tuple[set[str], set[str]]:
    """Reads ``api_dir/*.rst`` and ``*.md`` as text: ``(documented names, declared modules)``.

    Understands reST and MyST spellings of ``currentmodule``, ``automodule``,
    ``module``, the autodoc and ``py:`` object directives, and ``autosummary``
    tables; names without a dot resolve against the current module.
    """
    documented: set[str] = set()
    declared: set[str] = set()
    for page in sorted(Path(api_dir).glob("*.rst")) + sorted(Path(api_dir).glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        current = None  # the module that relative names belong to
        literal = None  # the fence of a Markdown code block being skipped: examples are not entries
        directives: list[str] = []  # fences of the open MyST directive blocks
        for i, line in enumerate(lines):
            fence = _CODE_FENCE.match(line) if page.suffix == ".md" else None
            if literal is not None:
                if fence and fence["fence"] == literal and not fence["info"]:
                    literal = None
                continue
            if fence and fence["info"].startswith("{"):
                directives.append(fence["fence"])
            elif fence and not fence["info"] and directives and fence["fence"] == directives[-1]:
                directives.pop()
                continue
            elif fence:
                literal = fence["fence"]
                continue
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            directive, arg = m["rst"] or m["md"], m["arg"]
            if directive in _MODULE_DECLARATIONS | {"currentmodule"}:
                current = arg
                if directive in _MODULE_DECLARATIONS:
                    declared.add(arg)
            elif directive in _AUTODOC_ENTRIES and arg:
                documented.add(_qualify(arg, current))
            elif directive == "autosummary":
                documented.update(_qualify(entry, current) for entry in _block_lines(lines, i + 1, m))
    return documented, declared


def _qualify(name: str, current: str | None) -> str:
    name = name.lstrip("~")
    if name.split(".", 1)[0] == PACKAGE or current is None:
        return name
    return f"{current}.{name}"


def _block_lines(lines: list[str], start: int, match: re.Match) -> list[str]:
    """The entries in a directive's body (options and blank lines skipped)."""
    out = []
    for line in lines[start:]:
        text = line.strip()
        if match["fence"]:
            if text == match["fence"]:
                break
        elif text and len(line) - len(line.lstrip()) <= len(match["indent"]):
            break
        if text and not text.startswith(":") and text != "---":
            out.append(text.split()[0])
    return out


#: What :func:`import_object` returns for a path that names nothing.
MISSING = object()


def import_object(dotted: str):
    """The object at a dotted path (module attributes and class members), or ``MISSING``."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return MISSING
        return obj
    return MISSING


# --------------------------------------------------------------------------- Sphinx


def setup(app):
    from docutils import nodes
    from sphinx import addnodes
    from sphinx.ext.autosummary import autosummary_table
    from sphinx.util import logging
    from sphinx.util.nodes import make_refnode

    logger = logging.getLogger(__name__)

    def store(env) -> dict[str, set[str]]:
        if not hasattr(env, "attnax_api_entries"):
            env.attnax_api_entries = {}
        return env.attnax_api_entries

    def collect(app, doctree: nodes.document) -> None:
        docname = app.env.docname
        if not docname.startswith("api/"):
            return
        names = set()
        for sig in doctree.findall(addnodes.desc_signature):
            if sig.get("fullname"):
                names.add(".".join(filter(None, (sig.get("module"), sig["fullname"]))))
        for table in doctree.findall(autosummary_table):
            names.update(ref["reftarget"] for ref in table.findall(addnodes.pending_xref))
        store(app.env)[docname] = names

    def purge(app, env, docname):
        store(env).pop(docname, None)

    def merge(app, env, docnames, other):
        store(env).update({d: names for d, names in store(other).items() if d in docnames})

    def check(app, env):
        documented = set().union(*store(env).values())
        declared = {name for name, entry in env.get_domain("py").modules.items() if entry.docname.startswith("api/")}
        try:
            problems = missing(documented, declared, public_modules())
        except AttributeError as e:  # a public module without __all__
            problems = [str(e)]
        for problem in problems:
            logger.warning("API coverage: %s", problem, type="attnax", subtype="api_coverage")

    def documented_objects(env) -> dict[int, tuple[str, object]]:
        """``id(object) -> (name, entry)`` for every attnax object or module documented in full."""
        py = env.get_domain("py")
        size = (len(py.objects), len(py.modules))
        cache = getattr(env, "_attnax_by_id", None)
        if cache is None or cache[0] != size:
            by_id = {}
            entries = [*py.modules.items(), *((n, e) for n, e in py.objects.items() if not e.aliased)]
            for name, entry in entries:
                if name.startswith(PACKAGE + "."):
                    obj = import_object(name)
                    if callable(obj) or isinstance(obj, types.ModuleType):
                        by_id.setdefault(id(obj), (name, entry))
            cache = env._attnax_by_id = (size, by_id)
        return cache[1]

    def resolve_alias(app, env, node, contnode):
        if node.get("refdomain") != "py":
            return None
        target = node["reftarget"].lstrip("~.")
        context = node.get("py:module")
        candidates = [target] if target.startswith(PACKAGE + ".") else []
        if context and context.startswith(PACKAGE):
            candidates.append(f"{context}.{target}")
        for name in candidates:
            for alias, real in MODULE_ALIASES.items():
                if name == alias or name.startswith(alias + "."):
                    name = real + name[len(alias) :]
            obj = import_object(name)
            if obj is MISSING:
                continue
            hit = documented_objects(env).get(id(obj))
            if hit is not None:
                full, entry = hit
                return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, full)
        if candidates and candidates[0] == target and not _is_private(target):
            logger.warning(
                "reference to `%s`, which no API page documents", target,
                location=node, type="attnax", subtype="api_reference",
            )  # fmt: skip
        return None

    app.connect("doctree-read", collect)
    app.connect("env-purge-doc", purge)
    app.connect("env-merge-info", merge)
    app.connect("env-check-consistency", check)
    app.connect("missing-reference", resolve_alias)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
