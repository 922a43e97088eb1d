"""The feature browser's pages and assets (package data under `train/assets/`), rendered for the
server (`base` "/") or for the static export (`base` "./"): the same HTML and script either way,
told which data source to use by `mode`.
"""

from __future__ import annotations

import html
from importlib import resources

PAGES = ("index", "feature", "compare")


def assets_dir():
    return resources.files("train") / "assets"


def page_html(name: str, mode: str, base: str, title: str) -> str:
    """One of the pages, for the server (`base` "/") or the static export (`base` "./")."""
    text = (assets_dir() / "browse" / f"{name}.html").read_text()
    return text.replace("%MODE%", mode).replace("%BASE%", base).replace("%TITLE%", html.escape(title))
