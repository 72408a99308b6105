"""Cleaning generated text: read the small JSON object an LLM was asked for, drop near duplicates, split
train/holdout by a hash of the text. Pure functions, no Ray: the generation jobs call them on streamed rows.

    parse_json_field('Sure! ```json\\n{"question": "Is tofu healthy?",}\\n```', "question")
        -> ("Is tofu healthy?", "")            # fenced, text around it, a trailing comma: repaired
    parse_json_field("I like soup", "question") -> (None, "no_json_object")

A row that cannot be used is dropped with a reason (a short snake_case word) that the jobs count and report.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_SINGLE_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'")


def _first_object(text: str) -> str | None:
    """The first balanced ``{...}`` in ``text`` (quotes respected), or None."""
    start = text.find("{")
    while start != -1:
        depth, quote, escaped = 0, "", False
        for i in range(start, len(text)):
            ch = text[i]
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = ""
            elif ch in "\"'":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i + 1]
        start = text.find("{", start + 1)
    return None


def _loads_repaired(candidate: str) -> object:
    """``json.loads`` of ``candidate``, then of it with the usual damage undone: trailing commas, then single
    quotes as string delimiters. Raises ValueError when nothing parses."""
    attempts = [candidate, _TRAILING_COMMA.sub(r"\1", candidate)]
    attempts.append(_SINGLE_QUOTED.sub(lambda m: json.dumps(m.group(1).replace("\\'", "'")), attempts[-1]))
    for attempt in attempts:
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            continue
    raise ValueError("not JSON after repair")


def parse_json_field(text: str, field: str) -> tuple[str | None, str]:
    """The string ``field`` of the JSON object in an LLM's answer, and "" -- or (None, reason) when there is none.

    Repaired: a code fence around the object, text before or after it, a trailing comma, single-quoted strings,
    an object cut off before its closing quote and brace; failing that, the field's first whole string value is
    taken from a broken object (``{"question": "Is tofu ok?" I wonder]``).
    Reasons: ``no_json_object``, ``bad_json``, ``missing_field`` (also a non-string or empty value).
    """
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    candidate = _first_object(body)
    if candidate is None and "{" in body:  # cut off before its end: close the string and the object
        tail = body[body.index("{"):].strip()
        candidate = tail + ('"}' if tail.count('"') % 2 else "}")
    if candidate is None:
        return None, "no_json_object"
    try:
        value = _loads_repaired(candidate)
    except ValueError:
        # the field's own string is often whole when the object around it is not (a stray quote, junk after it)
        match = re.search(r'"' + re.escape(field) + r'"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
        if match is None:
            return None, "bad_json"
        value = {field: json.loads(f'"{match.group(1)}"')}
    item = value.get(field) if isinstance(value, dict) else None
    if not isinstance(item, str) or not item.strip():
        return None, "missing_field"
    return " ".join(item.split()), ""


def normalise(text: str) -> str:
    """Lower case, accents and punctuation removed, whitespace collapsed: the key for exact duplicates."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _shingles(text: str, n: int) -> set[str]:
    words = normalise(text).split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _hash64(text: str, salt: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt.to_bytes(16, "little")).digest(),
                          "little")


class NearDuplicateIndex:
    """Finds texts whose word n-gram sets overlap by Jaccard similarity >= ``threshold``, with MinHash
    signatures and locality-sensitive hashing (``bands`` x ``rows`` hashes), so each new text is compared only
    with the few earlier ones that share a band, never with all of them.

    Memory is one small signature per kept text (``bands * rows`` integers): flat enough for millions of rows.
    Candidates from the bands are confirmed on their estimated similarity, so a false hit is rare and a text at
    the threshold is caught with probability about 1 - (1 - t^rows)^bands (0.98 at t=0.7 with 16 x 4).
    """

    def __init__(self, threshold: float = 0.7, *, ngram: int = 3, bands: int = 16, rows: int = 4):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold, self.ngram, self.bands, self.rows = threshold, ngram, bands, rows
        self._buckets: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        self._signatures: list[tuple[int, ...]] = []
        self._exact: set[str] = set()

    def signature(self, text: str) -> tuple[int, ...]:
        shingles = _shingles(text, self.ngram)
        return tuple(min(_hash64(s, k) for s in shingles) for k in range(self.bands * self.rows))

    def similarity(self, a: tuple[int, ...], b: tuple[int, ...]) -> float:
        """MinHash estimate of the Jaccard similarity of two signatures."""
        return sum(x == y for x, y in zip(a, b)) / len(a)

    def _bands(self, sig: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
        return [(b, sig[b * self.rows:(b + 1) * self.rows]) for b in range(self.bands)]

    def find(self, text: str) -> str:
        """"exact_duplicate" or "near_duplicate" when ``text`` matches a remembered text, else ""."""
        if normalise(text) in self._exact:
            return "exact_duplicate"
        sig = self.signature(text)
        seen: set[int] = set()
        for band in self._bands(sig):
            for j in self._buckets.get(band, ()):
                if j not in seen:
                    seen.add(j)
                    if self.similarity(sig, self._signatures[j]) >= self.threshold:
                        return "near_duplicate"
        return ""

    def add(self, text: str) -> None:
        self._exact.add(normalise(text))
        sig = self.signature(text)
        for band in self._bands(sig):
            self._buckets.setdefault(band, []).append(len(self._signatures))
        self._signatures.append(sig)

    def check(self, text: str) -> str:
        """`find`, and a new ``text`` is remembered."""
        reason = self.find(text)
        if not reason:
            self.add(text)
        return reason


def holdout_split(text: str, holdout_fraction: float, seed: int = 0) -> str:
    """"holdout" or "train" from a hash of the normalised text: the same text lands in the same split in every
    run, on every machine, whatever order the rows came in."""
    digest = hashlib.sha256(f"{seed}:{normalise(text)}".encode()).digest()
    return "holdout" if int.from_bytes(digest[:8], "big") / 2**64 < holdout_fraction else "train"


def length_problem(text: str, min_words: int, max_words: int) -> str:
    """"too_short" / "too_long" when ``text`` has fewer than ``min_words`` or more than ``max_words`` words."""
    words = len(text.split())
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    return ""
