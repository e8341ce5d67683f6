"""The README stays a map: short, every link and picture present, every config section and
every docs/*.md page listed; the pipeline diagram script draws."""

from __future__ import annotations

import dataclasses
import re
import runpy
from pathlib import Path

from PIL import Image

from landmarks.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|<img src=\"([^\"]+)\"")


def _links(path: Path) -> list[str]:
    return [a or b for a, b in LINK.findall(path.read_text(encoding="utf-8")) if not (a or b).startswith("http")]


def test_readme_is_a_short_map():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_links_and_pictures_exist():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for link in _links(page):
            assert (page.parent / link).exists(), f"{page.name}: {link} does not exist"


def test_readme_lists_every_docs_page_and_config_section():
    text = README.read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name} (Further reading)"
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", text, re.M)}
    for f in dataclasses.fields(Config):
        assert f.name in rows, f"README's Config table has no row for section `{f.name}`"


def test_pipeline_diagram_draws(tmp_path):
    draw = runpy.run_path(str(ROOT / "docs" / "make_diagram.py"))["draw"]
    out = draw(tmp_path / "pipeline.png")
    with Image.open(out) as im:
        assert im.size[0] > 800 and im.size[1] > 250
