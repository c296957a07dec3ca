"""Posters, served by item id only: the path comes from the catalogue's own ``image_path``
(never from the request), and an item without a readable picture gets a generated tile with
its title instead of a broken image."""

from __future__ import annotations

import hashlib
import textwrap
from html import escape
from pathlib import Path

from avrec.web.catalogue import ItemFacts

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
               ".webp": "image/webp", ".gif": "image/gif"}
WIDTH, HEIGHT = 200, 300
PALETTE = ("#264653", "#2a9d8f", "#6d597a", "#b56576", "#355070", "#3d405b", "#52796f",
           "#7f5539")


def poster_file(facts: ItemFacts | None) -> tuple[Path, str] | None:
    """(file, media type) of the item's own picture, or None when it has none usable."""
    if facts is None or not facts.image_path:
        return None
    path = Path(facts.image_path)
    media = IMAGE_TYPES.get(path.suffix.lower())
    if media is None or not path.is_file():
        return None
    return path, media


def placeholder_svg(title: str, year: int | None = None) -> str:
    """A poster-shaped SVG tile: the title on a colour chosen by the title."""
    colour = PALETTE[int(hashlib.sha1(title.encode()).hexdigest(), 16) % len(PALETTE)]
    lines = textwrap.wrap(title, 16)[:6] or ["?"]
    top = HEIGHT / 2 - 13 * len(lines)
    text = "".join(
        f'<text x="{WIDTH / 2:.0f}" y="{top + 26 * i:.0f}" font-size="20" '
        f'text-anchor="middle" fill="#fff" font-family="sans-serif">{escape(line)}</text>'
        for i, line in enumerate(lines))
    if year:
        text += (f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 24}" font-size="16" '
                 f'text-anchor="middle" fill="#ddd" font-family="sans-serif">{year}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
            f'<rect width="100%" height="100%" fill="{colour}"/>{text}</svg>')
