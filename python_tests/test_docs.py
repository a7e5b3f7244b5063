"""The docs say what the product is: README's Python examples run, ARCHITECTURE's module map matches the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks(ROOT / "README.md"))))
def test_readme_python_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    code = python_blocks(ROOT / "README.md")[index]
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_readme_has_python_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 2


def test_architecture_names_only_modules_that_exist():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"(sophon_ext/[\w/]+\.py)", text))
    assert named, "ARCHITECTURE.md names no module"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "sophon_ext").rglob("*.py") if p.name != "__init__.py"}
    unnamed = sorted(p for p in package if p not in named and Path(p).name not in text)
    assert not unnamed, f"modules missing from ARCHITECTURE.md's map: {unnamed}"


def test_docs_describe_the_product_not_its_history():
    pattern = re.compile(r"\bsession\b|sessions'|VM phase|slow phase|quiet phase|tried and not adopted", re.I)
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").rglob("*.md")]:
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{path.relative_to(ROOT)} narrates history: {hits[:3]}"


def test_the_api_reference_renders_every_public_module(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_api_docs", ROOT / "scripts" / "build_api_docs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = script.public_modules()
    assert {"sophon_ext", "sophon_ext.nn", "sophon_ext.optim.dropin", "sophon_ext.engine"} <= set(names)
    assert not any("._" in name for name in names)
    pages = script.build(tmp_path)
    index = (tmp_path / "index.html").read_text()
    for name in names:
        assert f'href="{name}.html"' in index
        assert name in (tmp_path / f"{name}.html").read_text()
    assert len(pages) == len(names) + 1
