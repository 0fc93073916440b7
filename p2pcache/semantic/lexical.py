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
- antonyms, when one prompt has a word and the other its opposite (largest / smallest);
- the kind of question (when / where / who / why), when both prompts ask a typed question;
- word order of two content words ("convert a string to an integer" / "an integer to a
  string", "what do pandas eat" / "what eats pandas");
- a swapped content word: the prompts align word by word and a run of content words was
  replaced by one that does not mean the same ("sort by value" / "sort by key", "who painted"
  / "who stole"). Whether two words mean the same is asked of the sentence embedder (cosine of
  the two replaced spans, at least ``SWAP_MIN_SIMILARITY``); without one, any swap rejects.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable

from p2pcache.semantic.contrast import (
    added_condition,
    measure_scales,
    prefix_antonym,
    quantifier_clash,
    role_clash,
    scale_clash,
    tense_clash,
    time_clash,
)
from p2pcache.semantic.words import ARTICLES as _ARTICLES
from p2pcache.semantic.words import STOP as _STOP
from p2pcache.semantic.words import norm_words as _norm_words
from p2pcache.semantic.words import stem as _stem

# Two replaced spans must be at least this similar (MiniLM cosine) to count as synonyms:
# "built"/"constructed" 0.83, "buy"/"purchase" 0.87 pass; "value"/"key" 0.39,
# "boiling"/"melting" 0.52, "tokyo"/"osaka" 0.81 (caught as entities) do not.
SWAP_MIN_SIMILARITY = 0.80

WordSimilarity = Callable[[str, str], float]

_WORD = re.compile(r"[A-Za-z][A-Za-z+#'\-]*|\d+(?:[.,]\d+)*")

_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "thirteen": "13",
    "fourteen": "14",
    "fifteen": "15",
    "sixteen": "16",
    "seventeen": "17",
    "eighteen": "18",
    "nineteen": "19",
    "twenty": "20",
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
    "hundred": "100",
    "thousand": "1000",
    "million": "1e6",
    "billion": "1e9",
    "dozen": "12",
    "first": "#1",
    "second": "#2",
    "third": "#3",
    "fourth": "#4",
    "fifth": "#5",
    "sixth": "#6",
    "seventh": "#7",
    "eighth": "#8",
    "ninth": "#9",
    "tenth": "#10",
    "last": "#last",
    "half": "1/2",
    "quarter": "1/4",
    "double": "x2",
    "twice": "x2",
    "triple": "x3",
    "single": "1",
    "pair": "2",
    "couple": "2",
}

_NEGATIONS = {
    "not",
    "no",
    "never",
    "none",
    "nothing",
    "nobody",
    "nowhere",
    "neither",
    "nor",
    "without",
    "cannot",
    "can't",
    "don't",
    "doesn't",
    "didn't",
    "isn't",
    "aren't",
    "wasn't",
    "weren't",
    "won't",
    "wouldn't",
    "shouldn't",
    "couldn't",
    "hasn't",
    "haven't",
    "hadn't",
    "mustn't",
    "except",
    "excluding",
    "unable",
    "lack",
    "lacks",
    "absent",
    "non",
}

# Units: a key term, and a sign that the answer is a quantity.
_UNITS = {
    "meter",
    "meters",
    "metre",
    "metres",
    "kilometer",
    "kilometers",
    "km",
    "mile",
    "miles",
    "inch",
    "inches",
    "foot",
    "feet",
    "yard",
    "yards",
    "centimeter",
    "centimeters",
    "cm",
    "millimeter",
    "millimeters",
    "mm",
    "gram",
    "grams",
    "kilogram",
    "kilograms",
    "kg",
    "pound",
    "pounds",
    "lb",
    "lbs",
    "ounce",
    "ounces",
    "oz",
    "liter",
    "liters",
    "litre",
    "litres",
    "gallon",
    "gallons",
    "cup",
    "cups",
    "celsius",
    "fahrenheit",
    "kelvin",
    "second",
    "seconds",
    "minute",
    "minutes",
    "hour",
    "hours",
    "day",
    "days",
    "week",
    "weeks",
    "month",
    "months",
    "year",
    "years",
    "byte",
    "bytes",
    "kb",
    "mb",
    "gb",
    "tb",
    "bit",
    "bits",
    "watt",
    "watts",
    "volt",
    "volts",
    "calorie",
    "calories",
    "mph",
    "acre",
    "acres",
    "hectare",
    "hectares",
}

# Terms whose substitution changes the answer while barely moving the embedding.
_KEY_TERMS = _UNITS | {
    # programming languages and tools
    "python",
    "javascript",
    "typescript",
    "java",
    "kotlin",
    "scala",
    "c",
    "c++",
    "c#",
    "golang",
    "rust",
    "ruby",
    "php",
    "perl",
    "swift",
    "objective-c",
    "haskell",
    "elixir",
    "erlang",
    "lua",
    "r",
    "matlab",
    "julia",
    "bash",
    "shell",
    "powershell",
    "sql",
    "mysql",
    "postgresql",
    "postgres",
    "sqlite",
    "mongodb",
    "redis",
    "html",
    "css",
    "react",
    "vue",
    "angular",
    "django",
    "flask",
    "node.js",
    "numpy",
    "pandas",
    "git",
    "docker",
    "kubernetes",
    "fortran",
    "cobol",
    "dart",
    "zig",
    "assembly",
    "excel",
    # data formats
    "json",
    "yaml",
    "xml",
    "csv",
    "toml",
    "pdf",
    # operating systems and platforms
    "windows",
    "linux",
    "macos",
    "mac",
    "ubuntu",
    "android",
    "ios",
    "iphone",
    # currencies
    "dollar",
    "dollars",
    "usd",
    "euro",
    "euros",
    "eur",
    "yen",
    "pound-sterling",
    "gbp",
    "rupee",
    "rupees",
    "bitcoin",
    "peso",
    "pesos",
    "franc",
    "francs",
    "yuan",
    # chemistry and biology terms that flip answers
    "acid",
    "alkaline",
    "oxygen",
    "hydrogen",
    "nitrogen",
    "carbon",
    "helium",
    "iron",
    "gold",
    "silver",
    "copper",
    "protein",
    "dna",
    "rna",
    "virus",
    "bacteria",
}

_ANTONYMS = [
    ("largest", "smallest"),
    ("biggest", "smallest"),
    ("largest", "tiniest"),
    ("longest", "shortest"),
    ("highest", "lowest"),
    ("tallest", "shortest"),
    ("fastest", "slowest"),
    ("hottest", "coldest"),
    ("oldest", "youngest"),
    ("oldest", "newest"),
    ("deepest", "shallowest"),
    ("heaviest", "lightest"),
    ("richest", "poorest"),
    ("best", "worst"),
    ("most", "least"),
    ("more", "less"),
    ("max", "min"),
    ("maximum", "minimum"),
    ("increase", "decrease"),
    ("add", "remove"),
    ("create", "delete"),
    ("start", "stop"),
    ("open", "close"),
    ("enable", "disable"),
    ("install", "uninstall"),
    ("encrypt", "decrypt"),
    ("encode", "decode"),
    ("compress", "decompress"),
    ("push", "pull"),
    ("upload", "download"),
    ("import", "export"),
    ("before", "after"),
    ("above", "below"),
    ("inside", "outside"),
    ("north", "south"),
    ("east", "west"),
    ("left", "right"),
    ("up", "down"),
    ("true", "false"),
    ("win", "lose"),
    ("buy", "sell"),
    ("gain", "lose"),
    ("advantages", "disadvantages"),
    ("pros", "cons"),
    ("benefits", "risks"),
    ("cause", "cure"),
    ("ascending", "descending"),
    ("first", "last"),
    ("uppercase", "lowercase"),
    ("warm", "cool"),
    ("hot", "cold"),
    ("heat", "cool"),
    ("lend", "borrow"),
    ("import", "export"),
    ("rise", "fall"),
    ("sunrise", "sunset"),
    ("summer", "winter"),
    ("male", "female"),
    ("men", "women"),
    ("boys", "girls"),
    ("strengths", "weaknesses"),
    ("similarities", "differences"),
    ("kill", "start"),
    ("lighter", "heavier"),
    ("cheaper", "expensive"),
    ("faster", "slower"),
    ("safe", "dangerous"),
    # verbs and particles whose opposite barely moves a sentence embedding
    ("float", "sink"),
    ("in", "out"),
    ("on", "off"),
    ("accept", "decline"),
    ("accept", "reject"),
    ("attach", "detach"),
    ("hide", "show"),
    ("hide", "unhide"),
    ("raise", "lower"),
    ("expand", "collapse"),
    ("merge", "split"),
    ("arrive", "depart"),
    ("enter", "exit"),
    ("pass", "fail"),
    ("include", "exclude"),
    ("allow", "block"),
    ("allow", "deny"),
    ("love", "hate"),
    ("remember", "forget"),
    ("send", "receive"),
    ("give", "take"),
    ("teach", "learn"),
    ("rise", "set"),
    ("maximize", "minimize"),
    ("public", "private"),
    ("internal", "external"),
    ("inner", "outer"),
    ("input", "output"),
    ("positive", "negative"),
    ("odd", "even"),
    ("plus", "minus"),
    ("day", "night"),
    ("morning", "evening"),
    ("beginning", "end"),
    ("start", "end"),
    ("start", "finish"),
    ("top", "bottom"),
    ("front", "back"),
    ("forward", "backward"),
    ("horizontal", "vertical"),
    ("horizontally", "vertically"),
    ("upper", "lower"),
    ("sunrise", "sunset"),
    ("wake", "sleep"),
    ("attack", "defend"),
    ("win", "loss"),
    ("profit", "loss"),
]
_OPPOSITE: dict[str, set[str]] = {}
for _a, _b in _ANTONYMS:
    _OPPOSITE.setdefault(_a, set()).add(_b)
    _OPPOSITE.setdefault(_b, set()).add(_a)

_NOT_ENTITIES = {
    "i",
    "what",
    "which",
    "who",
    "whom",
    "whose",
    "where",
    "when",
    "why",
    "how",
    "is",
    "are",
    "can",
    "could",
    "should",
    "would",
    "do",
    "does",
    "did",
    "please",
    "tell",
    "give",
    "explain",
    "write",
    "list",
    "name",
    "describe",
    "the",
    "a",
    "an",
    "in",
    "on",
    "of",
    "and",
    "or",
    "question",
    "answer",
    "q",
    "a:",
    "user",
    "model",
    "assistant",
    "system",
    "hey",
    "hi",
    "hello",
    "ok",
    "okay",
}


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def numbers(text: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for w in _words(text):
        lw = w.lower()
        if w[0].isdigit():
            out[w.replace(",", "")] += 1
        elif (
            lw in _NUMBER_WORDS and lw != "one"
        ):  # "one egg" is "an egg"; "one" vs "two" still differs
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
        if lw not in _KEY_TERMS:  # plurals: "viruses" is "virus", "liters" is "liter"
            for cut in (2, 1):
                if lw.endswith("es"[2 - cut :]) and lw[:-cut] in _KEY_TERMS:
                    lw = lw[:-cut]
                    break
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


_DIRECTIONAL_GAP = {"to", "into", "from", "a", "an", "the"}  # "X to Y": X and Y keep their roles
_TYPED_WH = {
    "when": "time",
    "where": "place",
    "who": "person",
    "whom": "person",
    "whose": "person",
    "why": "reason",
}


def question_types(text: str) -> set[str]:
    """The kinds of answer asked: time, place, person, reason; for "how", a quantity ("how
    many/much"), a measure ("how tall" -> height, "how old" -> age) or a manner ("how do")."""
    words = _norm_words(text)
    out = {_TYPED_WH[w] for w in words if w in _TYPED_WH}
    for i, w in enumerate(words[:-1]):
        if w == "how":
            out.add(_how_type(words[i + 1]))
    return out


# Nouns that ask for a quantity without "how many": "the number of sides", "the population".
_QUANTITY_NOUNS = {
    "number",
    "amount",
    "count",
    "total",
    "quantity",
    "population",
    "price",
    "cost",
    "percentage",
    "sum",
}


def _asks_quantity(text: str) -> bool:
    """ "how many/much", a quantity noun, or a unit: the answer is a number. Compared only
    as a whole: "how many languages" / "which languages" asks a list instead."""
    words = _norm_words(text)
    if numbers(text) or key_terms(text) & _UNITS:
        return True  # "what is 15 percent of 200", "in Celsius"
    for prev, w in zip(["", *words], words, strict=False):
        if w in _QUANTITY_NOUNS and not measure_scales(prev):
            return True  # "the largest number of moons" compares, it does not count
        if prev == "how" and w in ("many", "much"):
            return True
    return False


def _how_type(nxt: str) -> str:
    if nxt in ("many", "much"):
        return "quantity"
    if nxt == "often":
        return "frequency"
    if scales := measure_scales(nxt):
        return "measure:" + "/".join(scales)  # "how big" and "how large" ask the same
    return "manner"


def directional_pairs(text: str) -> set[tuple[str, str]]:
    """Consecutive content words with at most to/into/from/articles between them."""
    words = _norm_words(text)
    out: set[tuple[str, str]] = set()
    prev: str | None = None
    gap_ok = True
    for w in words:
        if w in _STOP:
            if w not in _DIRECTIONAL_GAP:
                gap_ok = False
            continue
        if prev is not None and gap_ok and _stem(prev) != _stem(w):
            out.add((_stem(prev), _stem(w)))
        prev, gap_ok = w, True
    return out


def _content(text: str) -> Counter[str]:
    return Counter(_stem(w) for w in _norm_words(text) if w not in _STOP)


def order_swap(new: str, old: str) -> str | None:
    """Same content words, two of them in swapped roles. Only checked when the content words
    agree exactly: a rephrasing ("raw eggs" / "eggs raw, safely") changes more than order."""
    if _content(new) != _content(old):
        return None
    pn, po = directional_pairs(new), directional_pairs(old)
    for a, b in sorted(pn - po):
        if (b, a) in po and (b, a) not in pn:
            return f"{a}/{b}"
    return None


def swapped_words(new: str, old: str, similarity: WordSimilarity | None) -> str | None:
    """A run of content words replaced by one that means something else, or None."""
    a = [w for w in _norm_words(old) if w not in _ARTICLES]
    b = [w for w in _norm_words(new) if w not in _ARTICLES]
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op != "replace":
            continue
        x, y = a[i1:i2], b[j1:j2]
        if any(w in _STOP for w in x + y):
            continue  # rephrased around function words: left to the embedding and the model
        if [_stem(w) for w in x] == [_stem(w) for w in y]:
            continue
        passive = {a[i1 - 1] if i1 else "", b[j1 - 1] if j1 else ""} & _PARTICIPLE_BEFORE
        if len(x) == len(y) == 1 and not passive and _past_tense_pair(x[0], y[0]):
            return f"{x[0]}/{y[0]} (tense)"  # "live"/"lived": MiniLM finds them alike
        xs, ys = " ".join(x), " ".join(y)
        if similarity is None or similarity(xs, ys) < SWAP_MIN_SIMILARITY:
            return f"{xs}/{ys}"
    return None


# After these an -ed form is a participle or an adjective ("get sunburned"), not a tense.
_PARTICIPLE_BEFORE = {"get", "got", "be", "been", "is", "are", "was", "were", "being"}


def _past_tense_pair(a: str, b: str) -> bool:
    """live/lived, start/started: the same verb in another tense."""
    for x, y in ((a, b), (b, a)):
        if y in (x + "ed", x + "d") or (x.endswith("y") and y == x[:-1] + "ied"):
            return True
    return False


def lexical_reject(new: str, old: str, similarity: WordSimilarity | None = None) -> str | None:
    """Why ``new`` must not reuse the answer to ``old``, or None when nothing clashes.
    ``similarity`` (cosine of two short phrases) lets synonym swaps pass; see `swapped_words`."""
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
    if clash := scale_clash(new, old):
        return f"opposite words ({clash})"
    if clash := prefix_antonym(new, old):
        return f"opposite words ({clash})"
    if clash := quantifier_clash(new, old):
        return f"scope differs ({clash})"
    if clash := tense_clash(new, old):
        return f"tense differs ({clash})"
    if clash := time_clash(new, old):
        return f"time differs ({clash})"
    qn, qo = question_types(new), question_types(old)
    if qn and qo and qn != qo:
        return f"question type differs ({'/'.join(sorted(qn ^ qo))})"
    if (q := _asks_quantity(new)) != _asks_quantity(old):
        return f"question type differs ({'' if q else 'not '}a quantity)"
    if word := role_clash(new, old):
        return f"roles differ ({word})"
    if swap := order_swap(new, old):
        return f"word order differs ({swap})"
    if swap := swapped_words(new, old, similarity):
        return f"swapped words ({swap})"
    if extra := added_condition(new, old, similarity):
        return f"condition differs ({extra})"
    return None


def _dedupe(xs: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in xs if not (x in seen or seen.add(x))]
