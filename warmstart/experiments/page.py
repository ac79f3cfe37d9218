"""Markdown and self-contained HTML pages built from the same report sections.

A report is a title and a list of :class:`Section` s, each a heading and blocks (paragraphs,
tables, images, bullet lists, preformatted text, collapsible groups). :func:`markdown_page` and
:func:`html_page` render them in the same order; the HTML embeds every image as a data URI and
loads nothing else (no scripts, stylesheets or fonts from elsewhere), the Markdown links each
image by its file name next to it (:func:`write_images` writes them).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union


@dataclass(frozen=True)
class TableData:
    """One table as strings, shared by the Markdown, HTML and console renderers."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Paragraph:
    """Text; `backticks` become code. ``lead`` is set in bold before it."""

    text: str
    lead: str = ""
    css: str = ""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 3


@dataclass(frozen=True)
class Table:
    """A table under its title at heading ``level`` (0: no title); ``scroll`` caps its height
    in the HTML."""

    data: TableData
    level: int = 3
    scroll: bool = False


@dataclass(frozen=True)
class Image:
    alt: str
    file: str
    png: bytes


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Preformatted:
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Details:
    """A group of blocks under a one-line summary: collapsible in the HTML (``open`` or not)."""

    summary: str
    blocks: tuple[Block, ...]
    open: bool = False


Block = Union[Paragraph, Heading, Table, Image, Bullets, Preformatted, Details]  # noqa: UP007


@dataclass(frozen=True)
class Section:
    """``id`` is the HTML element id; no ``heading`` for the verdict, which opens the page."""

    id: str
    heading: str | None
    blocks: tuple[Block, ...]


def images(sections: Sequence[Section]) -> Iterator[Image]:
    def walk(blocks):
        for block in blocks:
            if isinstance(block, Image):
                yield block
            elif isinstance(block, Details):
                yield from walk(block.blocks)

    for section in sections:
        yield from walk(section.blocks)


def write_images(sections: Sequence[Section], out: Path) -> None:
    """Write every image of ``sections`` as ``out / image.file`` (the Markdown links them)."""
    for image in images(sections):
        (out / image.file).write_bytes(image.png)


# ---- Markdown ----------------------------------------------------------------------------------

def md_table(table: TableData, level: int = 3) -> list[str]:
    head = [f"{'#' * level} {table.title}", ""] if level else []
    return [*head, "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header),
            *("| " + " | ".join(r) + " |" for r in table.rows), ""]


def _md_blocks(blocks: Sequence[Block]) -> list[str]:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Paragraph):
            lines += [f"**{b.lead}** {b.text}" if b.lead else b.text, ""]
        elif isinstance(b, Heading):
            lines += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Table):
            lines += md_table(b.data, b.level)
        elif isinstance(b, Image):
            lines += [f"![{b.alt}]({b.file})", ""]
        elif isinstance(b, Bullets):
            lines += [*(f"- {item}" for item in b.items), ""]
        elif isinstance(b, Preformatted):
            lines += [f"```{b.lang}", b.text.rstrip("\n"), "```", ""]
        elif isinstance(b, Details):
            lines += [f"#### {b.summary}", "", *_md_blocks(b.blocks)]
    return lines


def markdown_page(title: str, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        if section.heading:
            lines += [f"## {section.heading}", ""]
        lines += _md_blocks(section.blocks)
    return "\n".join(lines).rstrip("\n") + "\n"


# ---- HTML --------------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;"
    "margin-bottom:.8em}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
    "td:first-child{text-align:left}img{max-width:100%}"
    ".verdict{font-size:1.15em;background:#f3f6fa;padding:.6em 1em}"
    ".scroll{max-height:24em;overflow:auto;display:inline-block}"
    ".scroll th{position:sticky;top:0;background:#fff}"
    "pre{background:#f6f8fa;padding:.8em 1em;overflow:auto}details{margin:.4em 0}"
    "summary{cursor:pointer}"
)


def html_text(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def html_table(table: TableData, level: int = 3, scroll: bool = False) -> str:
    def cells(kind: str, row: Sequence[str]) -> str:
        return "<tr>" + "".join(f"<{kind}>{html.escape(c)}</{kind}>" for c in row) + "</tr>"

    rows = "".join(cells("td", r) for r in table.rows)
    body = f"<table>{cells('th', table.header)}{rows}</table>"
    if scroll:
        body = f"<div class='scroll'>{body}</div>"
    return (f"<h{level}>{html.escape(table.title)}</h{level}>" if level else "") + body


def _html_blocks(blocks: Sequence[Block]) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Paragraph):
            lead = f"<b>{html.escape(b.lead)}</b> " if b.lead else ""
            css = f" class='{b.css}'" if b.css else ""
            parts.append(f"<p{css}>{lead}{html_text(b.text)}</p>")
        elif isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Table):
            parts.append(html_table(b.data, b.level, b.scroll))
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            parts.append(f"<img alt='{html.escape(b.alt)}' src='data:image/png;base64,{data}'>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{html_text(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Preformatted):
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
        elif isinstance(b, Details):
            parts.append(f"<details{' open' if b.open else ''}><summary>"
                         f"{html_text(b.summary)}</summary>{_html_blocks(b.blocks)}</details>")
    return "".join(parts)


def html_page(title: str, sections: Sequence[Section]) -> str:
    body = "".join(
        f"<section id='{s.id}'>"
        + (f"<h2>{html.escape(s.heading)}</h2>" if s.heading else "")
        + _html_blocks(s.blocks) + "</section>"
        for s in sections
    )
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
            "</body></html>\n")
