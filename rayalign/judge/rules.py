"""Rule rewards: plain Python functions of (prompt, response) -> score in [0, 1].

They are cheap, deterministic and explainable, and they catch what a small judge misses (a 135M judge scores
good and bad vegetarian answers almost alike). Register a rule in ``RULES`` to name it in a reward config.
"""

from __future__ import annotations

import re
from typing import Callable

# Animal products a vegetarian (lacto-ovo) chatbot must not recommend, including hidden ones.
MEAT_TERMS = (
    "meat", "beef", "steak", "veal", "pork", "ham", "bacon", "pancetta", "prosciutto", "salami", "pepperoni",
    "chorizo", "sausage", "sausages", "hot dog", "lamb", "mutton", "goat meat", "venison", "chicken", "turkey",
    "duck", "goose", "poultry", "quail", "rabbit", "liver", "foie gras", "mince", "meatball", "meatballs",
    "burger patty", "fish", "salmon", "tuna", "cod", "haddock", "trout", "sardine", "sardines", "mackerel",
    "anchovy", "anchovies", "herring", "tilapia", "halibut", "seafood", "shellfish", "shrimp", "shrimps",
    "prawn", "prawns", "crab", "lobster", "oyster", "oysters", "mussels", "clams", "scallops", "squid",
    "calamari", "octopus", "caviar", "roe", "gelatin", "gelatine", "lard", "suet", "dripping", "tallow",
    "fish sauce", "oyster sauce", "shrimp paste", "bonito", "dashi", "worcestershire", "stock cube",
    "chicken stock", "beef stock", "bone broth", "chicken broth", "beef broth", "fish stock", "rennet",
)
# Words that, shortly before a meat term, mean the response is steering away from it.
NEGATIONS = (
    "no", "not", "without", "instead of", "avoid", "avoiding", "skip", "swap", "replace", "replacing",
    "free of", "free from", "rather than", "alternative to", "alternatives to", "substitute for", "in place of",
    "never", "don't", "do not", "isn't", "aren't", "contains no", "check for", "vegetarian", "vegan", "meat-free",
    "meatless", "plant-based", "mock", "faux", "fake", "imitation", "leave out", "omit", "remove", "kombu",
    "mushroom", "vegetable", "seaweed",
)
# Words that, later in the same sentence, turn a mention into a contrast ("Traditional recipes use lard, but ...").
CONTRASTS = ("but", "instead", "so look for", "so use", "so choose", "so pick", "so for a vegetarian")
_TERM = re.compile(r"\b(" + "|".join(re.escape(t) for t in sorted(MEAT_TERMS, key=len, reverse=True)) + r")\b",
                   re.IGNORECASE)
_NEG = re.compile(r"\b(" + "|".join(re.escape(t) for t in sorted(NEGATIONS, key=len, reverse=True)) + r")\b",
                  re.IGNORECASE)
_CONTRAST = re.compile(r"\b(" + "|".join(re.escape(t) for t in CONTRASTS) + r")\b", re.IGNORECASE)
_FREE = re.compile(r"^\s*-?\s*free\b", re.IGNORECASE)
_WINDOW_WORDS = 6


def meat_mentions(response: str) -> list[str]:
    """Meat / animal-ingredient terms that the response recommends (not ones it says to avoid or replace)."""
    found = []
    for match in _TERM.finditer(response):
        before = response[:match.start()]
        clause = re.split(r"[.!?;:\n]", before)[-1]  # negations do not carry across sentences
        window = " ".join(clause.split()[-_WINDOW_WORDS:])
        after = response[match.end():]
        rest_of_sentence = re.split(r"[.!?;\n]", after)[0]
        if _NEG.search(window) or _FREE.match(after) or _CONTRAST.search(rest_of_sentence):
            continue
        found.append(match.group(1).lower())
    return found


def vegetarian_lexicon(prompt: str, response: str) -> float:
    """0.01 when the response recommends meat, fish or a hidden animal ingredient; 0.99 otherwise."""
    return 0.01 if meat_mentions(response) else 0.99


RULES: dict[str, Callable[[str, str], float]] = {
    "vegetarian_lexicon": vegetarian_lexicon,
}
