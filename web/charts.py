"""Inline SVG charts: horizontal bars with standard-error whiskers, no plotting library."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Bar:
    label: str
    mean: float
    se: float | None = None
    highlight: bool = False


def bar_chart(title: str, bars: list[Bar], width: int = 560) -> str:
    """One bar per row: the mean, a whisker of +- one standard error, the value printed."""
    bars = [b for b in bars if b.mean is not None and math.isfinite(b.mean)]
    row, left, right, top = 22, 150, 70, 28
    height = top + row * max(len(bars), 1) + 10
    scale_to = max((b.mean + (b.se or 0.0) for b in bars), default=0.0) or 1.0
    span = width - left - right
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="4" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    for i, bar in enumerate(bars):
        y = top + i * row
        w = max(bar.mean, 0.0) / scale_to * span
        fill = "#e76f51" if bar.highlight else "#2a9d8f"
        parts.append(f'<text x="{left - 6}" y="{y + 14}" font-size="12" text-anchor="end">'
                     f'{escape(bar.label)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" '
                     f'fill="{fill}"><title>{escape(bar.label)}: {bar.mean:.4f}</title></rect>')
        if bar.se:
            lo = max(bar.mean - bar.se, 0.0) / scale_to * span + left
            hi = (bar.mean + bar.se) / scale_to * span + left
            mid = y + row / 2
            parts.append(f'<path class="whisker" d="M{lo:.1f} {mid:.1f}H{hi:.1f}'
                         f'M{lo:.1f} {mid - 5:.1f}V{mid + 5:.1f}M{hi:.1f} {mid - 5:.1f}'
                         f'V{mid + 5:.1f}" stroke="#222" fill="none"/>')
        parts.append(f'<text x="{width - right + 4}" y="{y + 14}" font-size="10">'
                     f'{bar.mean:.4f}</text>')
    parts.append("</svg>")
    return "".join(parts)
