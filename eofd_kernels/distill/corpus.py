"""Text for the jobs: English that ships with Python, the reference topics of ``pydoc_data``
(~460 KB), or a user's file of sentences.

Paragraphs of prose are split into sentences; code samples, grammar rules and headings are
dropped. Whole topics are held out for evaluation, so no held-out sentence shares a paragraph
with a training sentence.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["file_sentences", "stdlib_sentences"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_HEADING_RULE = re.compile(r"^[*=\-]{3,}$")


def _prose_paragraphs(text: str):
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(_HEADING_RULE.match(line.strip()) for line in lines):
            continue
        if any(line.lstrip().startswith((">>>", "...", "::=", "+--", "|")) for line in lines):
            continue  # code, grammar, tables
        if len(lines) > 1 and all(line.startswith("      ") for line in lines):
            continue  # deeply indented: a code sample
        yield " ".join(line.strip() for line in lines)


def stdlib_sentences(*, held_out_every: int = 5, min_words: int = 6,
                     max_words: int = 60) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` sentences; every ``held_out_every``-th topic (sorted) is held out."""
    from pydoc_data.topics import topics

    train, held_out = [], []
    for i, name in enumerate(sorted(topics)):
        target = held_out if i % held_out_every == 0 else train
        for paragraph in _prose_paragraphs(topics[name]):
            for sentence in _SENTENCE_END.split(paragraph):
                if min_words <= len(sentence.split()) <= max_words and sentence[0].isupper():
                    target.append(sentence)
    # Some sentences recur across topics: keep each once, and none of the held-out in train.
    held_out = list(dict.fromkeys(held_out))
    seen = set(held_out)
    return [s for s in dict.fromkeys(train) if s not in seen], held_out


def file_sentences(path: str | Path) -> list[str]:
    """A UTF-8 file's non-blank lines, stripped: one sentence a line."""
    if not Path(path).is_file():
        raise ValueError(f"text: expected 'stdlib' or a file of sentences, got {str(path)!r}")
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]
