"""The API pages (docs/api/) cover every public symbol; checked without building the docs.

The rule and the page parser live in docs/_ext/api_coverage.py, which the
Sphinx build uses too (`make docs` fails on the same gaps).
"""

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_checker():
    spec = importlib.util.spec_from_file_location("api_coverage", DOCS / "_ext" / "api_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api_coverage = _load_checker()


@pytest.fixture(scope="module")
def modules():
    return api_coverage.public_modules()


@pytest.fixture(scope="module")
def pages():
    return api_coverage.parse_api_pages(DOCS / "api")


def test_every_public_symbol_is_on_an_api_page(modules, pages):
    documented, declared = pages
    problems = api_coverage.missing(documented, declared, modules)
    assert not problems, "the API pages (docs/api/) are incomplete:\n" + "\n".join(problems)


def test_every_api_entry_names_a_real_object(pages):
    documented, declared = pages
    stale = sorted(name for name in documented | declared if api_coverage.import_object(name) is api_coverage.MISSING)
    assert not stale, f"docs/api/ documents names that do not exist: {stale}"


def test_public_modules_are_found(modules):
    # The fixed core of the API; new public subpackages are found on their own.
    core = {"attnax", "attnax.block_mask", "attnax.kernels", "attnax.reference", "attnax.score_mods", "attnax.typing"}
    assert core <= set(modules)
    assert not any(name.rsplit(".", 1)[-1].startswith("_") for name in modules)
    assert not set(api_coverage.NOT_API) & set(modules)


def test_checker_reports_a_missing_name_and_a_missing_page(tmp_path, modules):
    page = DOCS / "api" / "attnax.reference.rst"
    (tmp_path / page.name).write_text(page.read_text().replace(".. autofunction:: softmax_stats", ""))
    documented, declared = api_coverage.parse_api_pages(tmp_path)
    problems = api_coverage.missing(documented, declared, modules)
    assert any("`attnax.reference.softmax_stats`" in p for p in problems)
    assert any("module `attnax.kernels` has no API page" in p for p in problems)
    assert not any("attnax.reference.attention_reference" in p for p in problems)


def test_parser_reads_rst_and_myst_spellings(tmp_path):
    (tmp_path / "a.rst").write_text(
        "``x``\n=====\n\n.. automodule:: attnax.kernels\n\n.. currentmodule:: attnax.kernels\n\n"
        ".. autofunction:: standard_attention\n\n.. autosummary::\n   :nosignatures:\n\n   causal_mod\n"
        "   ~attnax.score_mods.softcap_mod\n\nAfter the table.\n\n.. py:function:: flash_attention(q, k, v)\n"
    )
    (tmp_path / "b.md").write_text(
        "# y\n\n```{py:module} attnax.reference\n```\n\n```{autofunction} attention_reference\n```\n\n"
        "```{autosummary}\n:nosignatures:\nsoftmax_stats\n```\n\nText\n"
    )
    documented, declared = api_coverage.parse_api_pages(tmp_path)
    assert declared == {"attnax.kernels", "attnax.reference"}
    assert documented == {
        "attnax.kernels.standard_attention",
        "attnax.kernels.causal_mod",
        "attnax.score_mods.softcap_mod",
        "attnax.kernels.flash_attention",
        "attnax.reference.attention_reference",
        "attnax.reference.softmax_stats",
    }
