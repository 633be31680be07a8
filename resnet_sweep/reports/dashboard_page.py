"""The dashboard's page: its sections (a title, a note, a plotly figure) as one self-contained HTML
file, plotly.js packed inside (gzipped, unpacked by the browser: no network needed to open it)."""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
from dataclasses import dataclass


@dataclass
class Section:
    title: str
    note: str  # one or two sentences above the plot (plain text)
    figure: object | None = None  # a plotly Figure; None: the note alone


@functools.cache
def _bundled_plotly() -> str:
    """plotly.js, gzipped and base64-encoded (about 1.9 MB instead of 4.8): the browser unpacks it."""
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), compresslevel=9, mtime=0)).decode()


LOADER = """
(async () => {
  const packed = document.getElementById("plotly-js-gzip").textContent.trim();
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const script = document.createElement("script");
  script.textContent = await new Response(stream).text();
  document.head.appendChild(script);
  for (const data of document.querySelectorAll("script[data-figure]")) {
    const figure = JSON.parse(data.textContent);
    const div = document.getElementById(data.dataset.figure);
    await Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false});
  }
  document.body.dataset.rendered = "true";
})().catch((e) => { document.getElementById("error").textContent = "The plots could not be drawn: " + e; });
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
p.note { color: #555; margin: 0.3em 0 0.6em; } nav a { margin-right: 1em; } #error { color: crimson; }
"""


def to_html(title: str, summary: str, parts: list[Section]) -> str:
    """The page: a title, a summary line, a table of contents, then each section's note and plot."""
    body, toc = [], []
    for i, part in enumerate(parts):
        anchor = f"section-{i}"
        toc.append(f'<a href="#{anchor}">{html.escape(part.title)}</a>')
        body.append(f'<h2 id="{anchor}">{html.escape(part.title)}</h2>\n<p class="note">{html.escape(part.note)}</p>')
        if part.figure is not None:
            figure = json.loads(part.figure.to_json())
            data = json.dumps(figure, separators=(",", ":")).replace("</", "<\\/")
            body.append(f'<div id="plot-{i}" class="plot"></div>')
            body.append(f'<script type="application/json" data-figure="plot-{i}">{data}</script>')
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<p>{html.escape(summary)}</p><p id="error"></p>',
            "<nav>" + " ".join(toc) + "</nav>",
            *body,
            f'<script id="plotly-js-gzip" type="application/octet-stream">{_bundled_plotly()}</script>',
            f"<script>{LOADER}</script>",
            "</body></html>",
        ]
    )
