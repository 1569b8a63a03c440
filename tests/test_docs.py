"""The docs that ship stay true to the code: generated reference pages, documented metrics, working links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dyntie_cli import reference
from tests.conftest import invoke
from tests.conftest import rows as _rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", sorted(reference.PAGES))
def test_generated_reference_pages_match_the_code(page):
    text = (ROOT / "docs" / page).read_text()
    assert text == reference.PAGES[page](), f"docs/{page} is stale: run `python -m dyntie_cli.reference`"


def test_every_column_of_the_schema_is_described():
    for table, columns in reference._schema().items():
        assert table in reference.COLUMNS, table
        missing = [c for c, _ in columns if c not in reference.COLUMNS[table]]
        assert not missing, (table, missing)


def test_every_metric_a_run_writes_is_documented(runner, tmp_path):
    db = tmp_path / "r.duckdb"
    r = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "6", "--decide-every", "2",
               "--db", db, "--out", tmp_path / "runs", "--quiet")
    assert r.exit_code == 0, r.stderr
    documented = set(reference.METRICS)
    (metric,) = _rows(db, "SELECT metric FROM runs")[0]
    for split, name in _rows(db, "SELECT DISTINCT split, name FROM metrics"):
        name = "best_<metric>" if name == f"best_{metric}" else name  # one entry for every headline metric
        assert (split, name) in documented or (split, "*") in documented, (split, name)


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: p.name)
def test_links_between_pages_resolve_and_no_page_points_outside_the_repository(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).resolve().exists(), f"{page.name} links to missing {target}"
    assert "../shared" not in text, f"{page.name} names a path outside the repository"


@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), (["-x"], 2), (["a", "b"], 2)])
def test_the_reference_generator_explains_itself_and_writes_nothing_on_bad_arguments(args, code, monkeypatch,
                                                                                    capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["reference", *args])
    with pytest.raises(SystemExit) as stop:
        reference.main()
    assert stop.value.code == code and "usage: python -m dyntie_cli.reference" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no folder named after a flag
