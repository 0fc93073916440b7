"""Lexical checks of the L1 gate: differences that embeddings (and a small model) miss.

Sentence embeddings put "convert 5 miles to km" and "convert 50 miles to km", or "sort a list
in Python" and "sort a list in Rust", next to each other (cosine > 0.9), and a 270M model scores
a cached answer almost the same under both. These checks catch such near-misses cheaply and
deterministically; each returns the reason it rejected, so answers and benchmarks can say why.

A check rejects when the two prompts differ in:
- numbers (digits, number words, ordinals), as multisets;
- negation (not, no, never, without, n't, ...), by count;
- "key terms": programming languages, data formats, units, currencies, operating systems;
- named entities (capitalized words not at a sentence start), as sets, and their order when
  the sets agree ("from Paris to Rome" vs "from Rome to Paris");
- antonyms, when one prompt has a word and the other its opposite (largest / smallest).
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z][A-Za-z+#'\-]*|\d+(?:[.,]\d+)*")

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40",
    "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100", "thousand": "1000", "million": "1e6", "billion": "1e9", "dozen": "12",
    "first": "#1", "second": "#2", "third": "#3", "fourth": "#4", "fifth": "#5", "sixth": "#6",
    "seventh": "#7", "eighth": "#8", "ninth": "#9", "tenth": "#10", "last": "#last",
    "half": "1/2", "quarter": "1/4", "double": "x2", "twice": "x2", "triple": "x3",
    "single": "1", "pair": "2", "couple": "2",
}

_NEGATIONS = {
    "not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "without",
    "cannot", "can't", "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't", "weren't",
    "won't", "wouldn't", "shouldn't", "couldn't", "hasn't", "haven't", "hadn't", "mustn't",
    "except", "excluding", "unable", "lack", "lacks", "absent", "non",
}

# Terms whose substitution changes the answer while barely moving the embedding.
_KEY_TERMS = {
    # programming languages and tools
    "python", "javascript", "typescript", "java", "kotlin", "scala", "c", "c++", "c#",
    "golang", "rust", "ruby", "php", "perl", "swift", "objective-c", "haskell", "elixir",
    "erlang", "lua", "r", "matlab", "julia", "bash", "shell", "powershell", "sql", "mysql",
    "postgresql", "postgres", "sqlite", "mongodb", "redis", "html", "css", "react", "vue",
    "angular", "django", "flask", "node.js", "numpy", "pandas", "git", "docker",
    "kubernetes", "fortran", "cobol", "dart", "zig", "assembly", "excel",
    # data formats
    "json", "yaml", "xml", "csv", "toml", "pdf",
    # operating systems and platforms
    "windows", "linux", "macos", "mac", "ubuntu", "android", "ios", "iphone",
    # units
    "meter", "meters", "metre", "metres", "kilometer", "kilometers", "km", "mile", "miles",
    "inch", "inches", "foot", "feet", "yard", "yards", "centimeter", "centimeters", "cm",
    "millimeter", "millimeters", "mm", "gram", "grams", "kilogram", "kilograms", "kg", "pound",
    "pounds", "lb", "lbs", "ounce", "ounces", "oz", "liter", "liters", "litre", "litres",
    "gallon", "gallons", "cup", "cups", "celsius", "fahrenheit", "kelvin", "second", "seconds",
    "minute", "minutes", "hour", "hours", "day", "days", "week", "weeks", "month", "months",
    "year", "years", "byte", "bytes", "kb", "mb", "gb", "tb", "bit", "bits", "watt", "watts",
    "volt", "volts", "calorie", "calories", "mph", "acre", "acres", "hectare", "hectares",
    # currencies
    "dollar", "dollars", "usd", "euro", "euros", "eur", "yen", "pound-sterling", "gbp",
    "rupee", "rupees", "bitcoin", "peso", "pesos", "franc", "francs", "yuan",
    # chemistry and biology terms that flip answers
    "acid", "alkaline", "oxygen", "hydrogen", "nitrogen", "carbon", "helium", "iron",
    "gold", "silver", "copper", "protein", "dna", "rna", "virus", "bacteria",
}

_ANTONYMS = [
    ("largest", "smallest"), ("biggest", "smallest"), ("largest", "tiniest"),
    ("longest", "shortest"), ("highest", "lowest"), ("tallest", "shortest"),
    ("fastest", "slowest"), ("hottest", "coldest"), ("oldest", "youngest"),
    ("oldest", "newest"), ("deepest", "shallowest"), ("heaviest", "lightest"),
    ("richest", "poorest"), ("best", "worst"), ("most", "least"), ("more", "less"),
    ("max", "min"), ("maximum", "minimum"), ("increase", "decrease"), ("add", "remove"),
    ("create", "delete"), ("start", "stop"), ("open", "close"), ("enable", "disable"),
    ("install", "uninstall"), ("encrypt", "decrypt"), ("encode", "decode"),
    ("compress", "decompress"), ("push", "pull"), ("upload", "download"), ("import", "export"),
    ("before", "after"), ("above", "below"), ("inside", "outside"), ("north", "south"),
    ("east", "west"), ("left", "right"), ("up", "down"), ("true", "false"), ("win", "lose"),
    ("buy", "sell"), ("gain", "lose"), ("advantages", "disadvantages"), ("pros", "cons"),
    ("benefits", "risks"), ("cause", "cure"), ("ascending", "descending"), ("first", "last"),
    ("uppercase", "lowercase"), ("warm", "cool"), ("hot", "cold"), ("heat", "cool"),
    ("lend", "borrow"), ("import", "export"), ("rise", "fall"), ("sunrise", "sunset"),
    ("summer", "winter"), ("male", "female"), ("men", "women"), ("boys", "girls"),
    ("strengths", "weaknesses"), ("similarities", "differences"), ("kill", "start"),
    ("lighter", "heavier"), ("cheaper", "expensive"), ("faster", "slower"), ("safe", "dangerous"),
]
_OPPOSITE: dict[str, set[str]] = {}
for _a, _b in _ANTONYMS:
    _OPPOSITE.setdefault(_a, set()).add(_b)
    _OPPOSITE.setdefault(_b, set()).add(_a)

_NOT_ENTITIES = {"i", "what", "which", "who", "whom", "whose", "where", "when", "why", "how",
                 "is", "are", "can", "could", "should", "would", "do", "does", "did", "please",
                 "tell", "give", "explain", "write", "list", "name", "describe", "the", "a",
                 "an", "in", "on", "of", "and", "or", "question", "answer", "q", "a:", "user",
                 "model", "assistant", "system", "hey", "hi", "hello", "ok", "okay"}


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def numbers(text: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for w in _words(text):
        lw = w.lower()
        if w[0].isdigit():
            out[w.replace(",", "")] += 1
        elif lw in _NUMBER_WORDS:
            out[_NUMBER_WORDS[lw]] += 1
    return out


def negations(text: str) -> int:
    n = 0
    for w in _words(text):
        lw = w.lower()
        if lw in _NEGATIONS or lw.endswith("n't"):
            n += 1
    return n


def key_terms(text: str) -> set[str]:
    found = set()
    for w in _words(text):
        lw = w.lower()
        if lw.endswith("'s"):
            lw = lw[:-2]
        if lw in _KEY_TERMS:
            found.add(lw)
    # symbols the tokenizer splits off
    low = text.lower()
    for sym in ("c++", "c#", "f#", "node.js", "objective-c", ".net"):
        if sym in low:
            found.add(sym)
    return found


def entities(text: str) -> list[str]:
    """Capitalized words that do not start a sentence, in order (possessive 's dropped)."""
    out: list[str] = []
    sentence_start = True
    for m in re.finditer(r"\S+", text):
        raw = m.group(0)
        word = raw.strip("\"'()[]{},;:!?.")
        if word.endswith("'s") or word.endswith("’s"):
            word = word[:-2]
        if word and word[0].isupper() and not sentence_start and word.lower() not in _NOT_ENTITIES:
            out.append(word.lower())
        sentence_start = raw.endswith((".", "?", "!", ":", "\n"))
    return out


def antonym_clash(a: str, b: str) -> str | None:
    wa = {w.lower() for w in _words(a)}
    wb = {w.lower() for w in _words(b)}
    for w in wa - wb:
        for o in _OPPOSITE.get(w, ()):
            if o in wb and o not in wa:
                return f"{w}/{o}"
    return None


def lexical_reject(new: str, old: str) -> str | None:
    """Why ``new`` must not reuse the answer to ``old``, or None when nothing clashes."""
    if numbers(new) != numbers(old):
        return "numbers differ"
    if negations(new) != negations(old):
        return "negation differs"
    kn, ko = key_terms(new), key_terms(old)
    if kn != ko:
        return f"key terms differ ({', '.join(sorted(kn ^ ko))})"
    en, eo = entities(new), entities(old)
    if set(en) != set(eo):
        return f"entities differ ({', '.join(sorted(set(en) ^ set(eo)))})"
    if len(set(en)) > 1 and _dedupe(en) != _dedupe(eo):
        return "entity order differs"
    if clash := antonym_clash(new, old):
        return f"opposite words ({clash})"
    return None


def _dedupe(xs: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in xs if not (x in seen or seen.add(x))]
