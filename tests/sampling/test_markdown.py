"""Translation units keep code and markdown structure; placeholders and the fragment fallback.

python -m pytest -q tests/sampling/test_markdown.py
"""

from __future__ import annotations

from csd_fast.sampling.markdown import Prose, join_markdown, restore, split_markdown

DOC = """# Install the `csd` tool

Run `pip install csd-fast` first, see https://example.org/docs.

```bash
pip install csd-fast   # keep me
echo "not prose"
```

1. First step
- [ ] a task
> a quote

| name | value |
|------|------:|
| beta | 0.1 |

    indented code stays
---
"""


def _translate(pieces, fn):
    return join_markdown(
        pieces, [restore(p, fn(p.masked)) or fn(p.body) for p in pieces if isinstance(p, Prose)]
    )


def test_identity_round_trip():
    pieces = split_markdown(DOC)
    assert _translate(pieces, lambda t: t) == DOC


def test_only_prose_changes():
    out = _translate(split_markdown(DOC), str.upper)
    lines, orig = out.splitlines(), DOC.splitlines()
    assert len(lines) == len(orig)
    for a, b in zip(orig, lines, strict=True):
        if a.startswith(("```", "pip", "echo", "    ", "|---", "---")) or not a.strip():
            assert a == b  # code, fences, alignment rows, rules, blank lines: verbatim
    assert "# INSTALL THE `csd` TOOL" in out  # heading marker and inline code kept
    assert "RUN `pip install csd-fast` FIRST, SEE https://example.org/docs." in out
    assert "1. FIRST STEP" in out and "- [ ] A TASK" in out and "> A QUOTE" in out
    assert "| NAME | VALUE |" in out and "| BETA | 0.1 |" in out


def test_lost_placeholder_is_detected():
    (p,) = [x for x in split_markdown("Call `f(x)` now") if isinstance(x, Prose)]
    assert p.masked == "Call ⟦0⟧ now"
    assert restore(p, "Rufe ⟦0⟧ jetzt") == "Rufe `f(x)` jetzt"
    assert restore(p, "Rufe jetzt") is None and restore(p, "⟦0⟧ ⟦0⟧") is None
    assert p.fragments() == [(True, "Call "), (False, "`f(x)`"), (True, " now")]
