"""Renders the API reference of sophon_ext from its docstrings into static HTML (no network).

    python scripts/build_api_docs.py [OUT]      (default: build/api; open OUT/index.html)

One page per public module (pydoc's HTML, as `python -m pydoc -w` writes it) and an
index linking them with each module's first docstring line.
"""

from __future__ import annotations

import html
import importlib
import pkgutil
import pydoc
import sys
from pathlib import Path


def public_modules(package_name: str = "sophon_ext") -> list[str]:
    """The package and its modules whose names do not start with an underscore, sorted."""
    package = importlib.import_module(package_name)
    names = [package_name]
    for info in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def summary(module) -> str:
    doc = (module.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def build(out: Path) -> list[Path]:
    """Write one page per public module and index.html into ``out``; returns the pages written."""
    out.mkdir(parents=True, exist_ok=True)
    pages, rows = [], []
    for name in public_modules():
        module = importlib.import_module(name)
        page = out / f"{name}.html"
        page.write_text(pydoc.html.page(pydoc.describe(module), pydoc.html.document(module, name)), encoding="utf-8")
        pages.append(page)
        rows.append(f'<li><a href="{page.name}">{html.escape(name)}</a>: {html.escape(summary(module))}</li>')
    index = out / "index.html"
    index.write_text("<!doctype html><title>sophon_ext API</title><h1>sophon_ext API reference</h1>\n<ul>\n"
                     + "\n".join(rows) + "\n</ul>\n", encoding="utf-8")
    return [index, *pages]


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "build/api")
    written = build(target)
    print(f"wrote {len(written)} pages to {target}/ (open {target / 'index.html'})")
