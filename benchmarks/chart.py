"""The ratio chart of a benchmark report: one bar per (subject, figure), all oriented so
that longer is better and 1.0x is the anchor, as text for the markdown report and as a
small SVG beside it (no plotting library needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Bar:
    subject: str
    figure: str  # e.g. "tunnels/s", "CPU/GB (inverse)"
    ratio: float  # better-is-larger: subject/anchor, or anchor/subject for costs


def text_chart(bars: Sequence[Bar], anchor: str, width: int = 40) -> list[str]:
    """A fixed-width bar chart (for a markdown code block); the scale is logarithmic
    from 0.1x to the largest ratio, with ``|`` marking 1.0x (the anchor)."""
    if not bars:
        return []
    top = max(10.0, max(b.ratio for b in bars))
    lo, hi = math.log10(0.1), math.log10(top)

    def col(x: float) -> int:
        x = min(max(x, 0.1), top)
        return round((math.log10(x) - lo) / (hi - lo) * width)

    one = col(1.0)
    label_w = max(len(f"{b.subject} {b.figure}") for b in bars)
    out = [f"{'':{label_w}}  {'0.1x':<{one}}1x{'':{max(0, width - one - 6)}}{top:.0f}x"]
    for b in bars:
        n = col(b.ratio)
        cells = ["█" if i < n else " " for i in range(width + 1)]
        if cells[one] == " ":
            cells[one] = "|"
        label = f"{b.subject} {b.figure}"
        out.append(f"{label:<{label_w}}  {''.join(cells)} {b.ratio:.2f}x")
    out.append(f"(longer is better; | is {anchor} = 1.0x; log scale)")
    return out


def svg_chart(bars: Sequence[Bar], anchor: str, title: str) -> str:
    """The same chart as an SVG document."""
    row, left, width, pad = 22, 330, 420, 14
    top_ratio = max(10.0, max((b.ratio for b in bars), default=1.0))
    lo, hi = math.log10(0.1), math.log10(top_ratio)

    def x(v: float) -> float:
        v = min(max(v, 0.1), top_ratio)
        return left + (math.log10(v) - lo) / (hi - lo) * width

    height = pad * 3 + row * (len(bars) + 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" '
        f'height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="{pad}" y="{pad + 4}" font-weight="bold">{escape(title)}</text>',
    ]
    y0 = pad * 2
    for ref in (0.1, 1.0, 10.0):
        if ref <= top_ratio:
            xr = x(ref)
            parts.append(
                f'<line x1="{xr:.1f}" y1="{y0}" x2="{xr:.1f}" y2="{height - pad}" '
                f'stroke="{"#333" if ref == 1.0 else "#ccc"}"/>'
            )
            parts.append(f'<text x="{xr - 8:.1f}" y="{height - 2}">{ref:g}x</text>')
    for i, b in enumerate(bars):
        y = y0 + row * i + 4
        color = "#2a7" if b.ratio >= 1.0 else "#c54"
        parts.append(
            f'<text x="{pad}" y="{y + 13}">{escape(b.subject)} · {escape(b.figure)}</text>'
        )
        parts.append(
            f'<rect x="{left}" y="{y}" width="{max(1.0, x(b.ratio) - left):.1f}" '
            f'height="{row - 6}" fill="{color}"/>'
        )
        parts.append(f'<text x="{x(b.ratio) + 4:.1f}" y="{y + 13}">{b.ratio:.2f}x</text>')
    parts.append(
        f'<text x="{left}" y="{height - pad - 2}" fill="#555">anchor: {escape(anchor)} '
        "= 1.0x; longer is better; log scale</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
