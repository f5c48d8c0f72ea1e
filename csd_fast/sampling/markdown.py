"""Markdown-safe translation units: code and structure are kept, only prose goes to the model.

    pieces = split_markdown(text)             # Keep(...) and Prose(prefix, body, suffix) pieces
    texts = [p.masked for p in pieces if isinstance(p, Prose)]     # what the model translates
    join_markdown(pieces, translations)        # the same skeleton with the prose replaced

Kept verbatim: fenced code blocks (``` or ~~~, with their info string), indented code, blank
lines, horizontal rules, and each line's markdown prefix (headings, list markers, task boxes,
block quotes), table pipes and alignment rows. Inline code spans and URLs inside prose become
placeholders (⟦0⟧, ⟦1⟧, ...) restored after translation; when a translation loses or repeats a
placeholder, that line is translated again fragment by fragment around the protected spans
(`fragments`), so code survives whatever the model does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")
_PREFIX = re.compile(r"^(\s*(?:#{1,6}\s+|[-*+]\s+(?:\[[ xX]\]\s+)?|\d+[.)]\s+|>\s?)*)")
_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_TABLE_ALIGN = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_PROTECT = re.compile(r"(`+)(?:(?!\1).)+?\1|https?://[^\s)\]>]+|<[^>\s]+>")
_PLACEHOLDER = "⟦{}⟧"


@dataclass
class Keep:
    text: str


@dataclass
class Prose:
    prefix: str
    body: str
    suffix: str
    protected: list[str] = field(default_factory=list)

    @property
    def masked(self) -> str:
        text = self.body
        for k, span in enumerate(self.protected):
            text = text.replace(span, _PLACEHOLDER.format(k), 1)
        return text

    def fragments(self) -> list[tuple[bool, str]]:
        """(translate?, text) pieces of the body around its protected spans."""
        out, last = [], 0
        for m in _PROTECT.finditer(self.body):
            if m.start() > last:
                out.append((True, self.body[last : m.start()]))
            out.append((False, m.group(0)))
            last = m.end()
        if last < len(self.body):
            out.append((True, self.body[last:]))
        return out


def _prose(prefix: str, body: str, suffix: str) -> list:
    if not body.strip():
        return [Keep(prefix + body + suffix)]
    lead = body[: len(body) - len(body.lstrip())]
    trail = body[len(body.rstrip()) :]
    core = body.strip()
    return [
        Prose(prefix + lead, core, trail + suffix, [m.group(0) for m in _PROTECT.finditer(core)])
    ]


def split_markdown(text: str) -> list:
    pieces: list = []
    fence = None
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        eol = line[len(body) :]
        m = _FENCE.match(body)
        if fence is not None:
            pieces.append(Keep(line))
            if m and m.group(2)[0] == fence[0] and len(m.group(2)) >= len(fence):
                fence = None
            continue
        if m:
            fence = m.group(2)
            pieces.append(Keep(line))
        elif not body.strip() or _RULE.match(body) or _TABLE_ALIGN.match(body):
            pieces.append(Keep(line))
        elif body.startswith(("    ", "\t")) and (not pieces or _is_code_context(pieces)):
            pieces.append(Keep(line))
        elif body.lstrip().startswith("|"):
            cells = body.split("|")
            for k, cell in enumerate(cells):
                sep = "|" if k < len(cells) - 1 else eol
                pieces += _prose("", cell, sep) if cell.strip() else [Keep(cell + sep)]
        else:
            prefix = _PREFIX.match(body).group(1)
            pieces += _prose(prefix, body[len(prefix) :], eol)
    return pieces


def _is_code_context(pieces: list) -> bool:
    """Indented code needs a blank line (or other code) before it, as in CommonMark."""
    last = pieces[-1]
    return isinstance(last, Keep) and (
        not last.text.strip() or last.text.startswith(("    ", "\t"))
    )


def restore(piece: Prose, translated: str) -> str | None:
    """The translation with its placeholders put back; None if one is lost or repeated."""
    text = translated.strip()
    for k, span in enumerate(piece.protected):
        mark = _PLACEHOLDER.format(k)
        if text.count(mark) != 1:
            return None
        text = text.replace(mark, span)
    return text


def join_markdown(pieces: list, translations: list[str]) -> str:
    """Reassemble: Prose pieces take the next translation (already restored), in order."""
    it = iter(translations)
    out = []
    for p in pieces:
        out.append(p.text if isinstance(p, Keep) else p.prefix + next(it) + p.suffix)
    return "".join(out)
