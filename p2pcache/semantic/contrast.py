"""Contrast checks of the L1 gate: one word that flips what a prompt asks.

Sentence embeddings (and a 270M model) score "is a crocodile larger than an alligator" and
"... smaller than ...", "do all fish have scales" and "do most fish ...", "sign in to Zoom"
and "sign out of Zoom" as near duplicates: antonyms and function words move a mean-pooled
vector very little, and MiniLM even finds "bigger"/"smaller" alike. These checks look at the
word classes where one word reverses the meaning. Each takes the two prompts and returns why
they differ, or None:

- `scale_clash`: gradable words on one scale with opposite poles (big/small, cheap/expensive,
  "more expensive"/"cheaper"); synonyms share a pole, so "bigger"/"larger" agree.
- `prefix_antonym`: a word against its negated form (legal/illegal, lock/unlock,
  harmful/harmless).
- `quantifier_clash`: the scope words (all/every/always, some/any/either, most/usually,
  few/rarely, only) must agree.
- `tense_clash`: the auxiliaries' tense (is / was / will), when both prompts have one.
- `time_clash`: deictic time words (yesterday / today / tomorrow, previous / current / next).
- `role_clash`: a word that moved between the roles of source and destination ("from X" /
  "to X"), comparison standard ("than X"), or number-bound ("100 dollars" / "in dollars").
- `added_condition`: a content word that one prompt adds ("in the microwave", "used Tesla",
  "recursively") and the other neither has, nor has a synonym of; words that only name the
  kind of answer ("which *city*", "the best *way*") do not count.

All are general rules over word classes; the word lists are ordinary English vocabulary,
not sentences of the evaluation set.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable

from p2pcache.semantic.words import ARTICLES, STOP, norm_words, stem

WordSimilarity = Callable[[str, str], float]

# An added word passes when the other prompt has a word at least this similar (MiniLM
# cosine): the same bar as a swapped word (lexical.SWAP_MIN_SIMILARITY).
ADDED_MIN_SIMILARITY = 0.80

# -- scales: gradable words, each pole with its synonyms ------------------------------------
# (scale, words of the + pole, words of the - pole). A word may sit on several scales
# ("short": height and length; "light": weight and brightness).
_SCALES: list[tuple[str, set[str], set[str]]] = [
    (
        "size",
        {"big", "large", "huge", "giant", "enormous", "vast", "massive"},
        {"small", "little", "tiny"},
    ),
    ("height", {"tall", "high"}, {"short", "low"}),
    ("length", {"long", "lengthy"}, {"short", "brief"}),
    ("speed", {"fast", "quick", "rapid", "speedy", "swift"}, {"slow", "sluggish"}),
    ("temperature", {"hot", "warm"}, {"cold", "cool", "chilly"}),
    ("weight", {"heavy"}, {"light", "lightweight"}),
    ("density", {"dense", "thick"}, {"sparse", "thin"}),
    ("age", {"old", "elderly", "ancient", "aged"}, {"young", "new", "modern"}),
    ("wealth", {"rich", "wealthy", "affluent"}, {"poor"}),
    (
        "quality",
        {"good", "fine", "excellent", "healthy", "beneficial"},
        {"bad", "poor", "terrible", "awful", "unhealthy", "harmful"},
    ),
    ("strength", {"strong", "powerful"}, {"weak", "feeble"}),
    ("wetness", {"wet", "humid", "rainy", "damp"}, {"dry", "arid"}),
    ("depth", {"deep"}, {"shallow"}),
    ("price", {"expensive", "costly", "pricey", "dear"}, {"cheap", "inexpensive", "affordable"}),
    ("safety", {"safe", "secure", "harmless"}, {"dangerous", "unsafe", "risky", "hazardous"}),
    ("brightness", {"bright", "light"}, {"dark", "dim"}),
    ("difficulty", {"hard", "difficult", "tough"}, {"easy", "simple"}),
    ("width", {"wide", "broad"}, {"narrow"}),
    ("loudness", {"loud", "noisy"}, {"quiet", "silent", "soft"}),
    ("hardness", {"hard", "firm"}, {"soft"}),
    ("timing", {"early"}, {"late"}),
    ("distance", {"far", "distant", "remote"}, {"near", "close", "nearby"}),
    ("amount", {"many", "much", "more", "most", "numerous"}, {"few", "little", "less", "least"}),
    ("popularity", {"popular", "common", "widespread"}, {"rare", "unpopular", "uncommon"}),
    ("mood", {"happy", "glad", "cheerful"}, {"sad", "unhappy", "miserable"}),
    ("truth", {"true", "correct", "right", "accurate"}, {"false", "wrong", "incorrect"}),
    ("cleanliness", {"clean"}, {"dirty"}),
    ("fullness", {"full"}, {"empty", "hungry"}),
    ("intelligence", {"smart", "intelligent", "clever"}, {"stupid", "dumb"}),
    ("girth", {"fat", "obese", "thick"}, {"thin", "slim", "skinny", "lean"}),
]
_POLE: dict[str, list[tuple[str, int]]] = {}
for _scale, _plus, _minus in _SCALES:
    for _w in _plus:
        _POLE.setdefault(_w, []).append((_scale, 1))
    for _w in _minus:
        _POLE.setdefault(_w, []).append((_scale, -1))

# Irregular comparatives and superlatives.
_IRREGULAR = {
    "better": "good",
    "best": "good",
    "worse": "bad",
    "worst": "bad",
    "fewer": "few",
    "fewest": "few",
    "farther": "far",
    "further": "far",
    "farthest": "far",
    "furthest": "far",
    "elder": "old",
    "eldest": "old",
}
_INTENSIFY = {"more": 1, "most": 1, "less": -1, "least": -1}  # "less expensive" = cheaper


def _base(word: str) -> str:
    """The positive form of a comparative or superlative on a known scale ("bigger" -> "big",
    "healthiest" -> "healthy", "safer" -> "safe"); other words unchanged."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _POLE:
        return word
    for suffix in ("est", "er"):
        if not word.endswith(suffix) or len(word) <= len(suffix) + 2:
            continue
        root = word[: -len(suffix)]
        candidates = [root, root + "e"]
        if root.endswith("i"):
            candidates.append(root[:-1] + "y")  # healthier -> healthy
        if len(root) > 2 and root[-1] == root[-2]:
            candidates.append(root[:-1])  # bigger -> big
        for c in candidates:
            if c in _POLE:
                return c
    return word


def _poles(text: str) -> dict[str, set[int]]:
    """Scale -> poles the prompt takes on it. "more X"/"less X" carry X's pole (flipped for
    less); "how many"/"how much" ask a quantity and take no pole."""
    words = norm_words(text)
    out: dict[str, set[int]] = {}
    sign = 1
    for i, w in enumerate(words):
        if w in ("many", "much") and i > 0 and words[i - 1] == "how":
            continue
        nxt = _base(words[i + 1]) if i + 1 < len(words) else ""
        if w in _INTENSIFY and nxt in _POLE and nxt not in _INTENSIFY:
            sign = _INTENSIFY[w]  # modifies the next word, is not an amount itself
            continue
        for scale, pole in _POLE.get(_base(w), ()):
            out.setdefault(scale, set()).add(pole * sign)
        sign = 1
    return out


def measure_scales(word: str) -> list[str]:
    """The scales a gradable word measures ("tall" -> height; "short" -> height, length)."""
    return sorted(scale for scale, _ in _POLE.get(_base(word), ()))


def scale_clash(new: str, old: str) -> str | None:
    pn, po = _poles(new), _poles(old)
    for scale in sorted(pn.keys() & po.keys()):
        if pn[scale] != po[scale]:
            return f"opposite on the {scale} scale"
    return None


# -- negated forms ---------------------------------------------------------------------------
_NEG_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "de", "anti")


def _negated_pair(a: str, b: str) -> bool:
    """b is a negated form of a (legal/illegal, lock/unlock, harmful/harmless)."""
    if len(a) < 3:
        return False
    for p in _NEG_PREFIXES:
        if b in (p + a, p + "-" + a):
            return True
    return a.endswith("ful") and b == a[:-3] + "less"


def prefix_antonym(new: str, old: str) -> str | None:
    wn, wo = set(norm_words(new)), set(norm_words(old))
    for a, b in ((wn, wo), (wo, wn)):
        for x in a - b:
            for y in b - a:
                if _negated_pair(x, y) or _negated_pair(y, x):
                    return f"{x}/{y}"
    return None


# -- scope: quantifiers and frequency adverbs ------------------------------------------------
_SCOPE = {
    "all": "all",
    "every": "all",
    "each": "all",
    "always": "all",
    "both": "all",
    "everyone": "all",
    "everybody": "all",
    "everything": "all",
    "entire": "all",
    "some": "some",
    "any": "some",  # in a question "any" asks for existence, as "some" does
    "either": "some",
    "several": "some",
    "sometimes": "some",
    "occasionally": "some",
    "most": "most",
    "mostly": "most",
    "usually": "most",
    "generally": "most",
    "often": "most",
    "frequently": "most",
    "many": "many",
    "few": "few",
    "rarely": "few",
    "seldom": "few",
    "hardly": "few",
    "barely": "few",
    "only": "only",
    "solely": "only",
    "exclusively": "only",
}


def scope_words(text: str) -> Counter[str]:
    words = norm_words(text)
    out: Counter[str] = Counter()
    for i, w in enumerate(words):
        prev = words[i - 1] if i else ""
        if w in ("many", "much") and prev == "how":
            continue  # "how many" asks a number
        if w in ("most", "least") and prev == "the":
            continue  # "the most moons": a superlative (scale_clash), not a scope
        if w == "few" and prev == "a":
            out["some"] += 1  # "a few" is some; "few" alone is nearly none
            continue
        if w in _SCOPE:
            out[_SCOPE[w]] += 1
    return out


def quantifier_clash(new: str, old: str) -> str | None:
    sn, so = scope_words(new), scope_words(old)
    if set(sn) != set(so):
        return "/".join(sorted(set(sn) ^ set(so)))
    return None


# -- tense and deictic time ------------------------------------------------------------------
_TENSE = {
    "is": "present",
    "are": "present",
    "am": "present",
    "do": "present",
    "does": "present",
    "has": "present",
    "was": "past",
    "were": "past",
    "did": "past",
    "had": "past",
    "will": "future",
    "shall": "future",
}


def tense_clash(new: str, old: str) -> str | None:
    """Both prompts mark a tense with an auxiliary and the tenses differ ("who is" / "who
    was"). A prompt without an auxiliary ("who wrote") is compared with nothing."""
    tn = {_TENSE[w] for w in norm_words(new) if w in _TENSE}
    to = {_TENSE[w] for w in norm_words(old) if w in _TENSE}
    if tn and to and tn != to:
        return "/".join(sorted(tn ^ to))
    return None


_TIME = {
    "yesterday": "past",
    "previous": "past",
    "former": "past",
    "formerly": "past",
    "ago": "past",
    "earlier": "past",
    "past": "past",
    "today": "now",
    "now": "now",
    "current": "now",
    "currently": "now",
    "tonight": "now",
    "nowadays": "now",
    "present": "now",
    "tomorrow": "future",
    "next": "future",
    "future": "future",
    "upcoming": "future",
    "soon": "future",
    "later": "future",
}


def time_clash(new: str, old: str) -> str | None:
    tn = {_TIME[w] for w in norm_words(new) if w in _TIME}
    to = {_TIME[w] for w in norm_words(old) if w in _TIME}
    if tn != to:
        return "/".join(sorted(tn ^ to))
    return None


# -- roles: source, destination, comparison standard, number ---------------------------------
_ROLE_MARKERS = {
    "from": "source",
    "out": "source",
    "off": "source",
    "to": "destination",
    "into": "destination",
    "onto": "destination",
    "toward": "destination",
    "towards": "destination",
    "than": "standard",
    "in": "place",
    "on": "place",
    "at": "place",
}
# Skipped between a marker and its word: "from *my* bank", "out *of* a folder".
_TRANSPARENT = ARTICLES | {"my", "your", "our", "their", "his", "her", "its", "of", "this", "that"}
_NUMBER_WORDS = {
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hundred",
    "thousand",
    "million",
    "dozen",
}


def roles(text: str) -> dict[str, set[str]]:
    """Content word (stem) -> the roles its nearest preceding marker gives it."""
    out: dict[str, set[str]] = {}
    marker: str | None = None
    for w in norm_words(text):
        if w[0].isdigit() or w in _NUMBER_WORDS:
            marker = "number"
        elif w in _ROLE_MARKERS:
            marker = _ROLE_MARKERS[w]
        elif w in _TRANSPARENT:
            continue
        elif w in STOP:
            marker = None
        else:
            if marker is not None:
                out.setdefault(stem(w), set()).add(marker)
            marker = None
    return out


def _roles_conflict(a: set[str], b: set[str], both_compare: bool) -> bool:
    if a == b:
        return False
    if ("source" in a and "destination" in b) or ("destination" in a and "source" in b):
        return True
    if both_compare and ("standard" in a) != ("standard" in b):
        return True  # "is X bigger than Y" / "is Y bigger than X"
    if ("number" in a) != ("number" in b) and a and b:
        return True  # "100 dollars in euros" / "100 euros in dollars"
    return False


def role_clash(new: str, old: str) -> str | None:
    rn, ro = roles(new), roles(old)
    both_compare = "than" in norm_words(new) and "than" in norm_words(old)
    shared = {stem(w) for w in norm_words(new)} & {stem(w) for w in norm_words(old)}
    for w in sorted(shared - STOP):
        if _roles_conflict(rn.get(w, set()), ro.get(w, set()), both_compare):
            return w
    return None


# -- added or dropped conditions -------------------------------------------------------------
# Words that name the kind of answer or its quality, not a condition on it: "which *city* is
# the capital", "what is the *best way* to", "where is it *located*".
_FRAME = {
    "way",
    "ways",
    "method",
    "methods",
    "step",
    "steps",
    "process",
    "procedure",
    "best",
    "easiest",
    "simplest",
    "proper",
    "properly",
    "correct",
    "correctly",
    "right",
    "good",
    "city",
    "country",
    "place",
    "person",
    "name",
    "number",
    "amount",
    "type",
    "time",
    "new",
    "exactly",
    "actually",
    "really",
    "located",
    "situated",
    "called",
    "known",
    "possible",
    "able",
    "ok",
    "okay",
    "fine",
    "safe",
    "true",
    "mean",
    "meaning",
    "use",
    "using",
    "tell",
    "explain",
    "describe",
    "know",
    "need",
    "want",
    "like",
    "go",
    "happen",
}


def _related(word: str, others: list[str], similarity: WordSimilarity | None) -> bool:
    """Does the other prompt carry this word, a form of it or a synonym?"""
    for o in others:
        if stem(o) == stem(word):
            return True
        n = min(len(o), len(word))
        if n >= 4 and o[:4] == word[:4] and abs(len(o) - len(word)) <= 3:
            return True  # boil / boiling, discover / discoverer
    if similarity is None:
        return False
    return any(similarity(word, o) >= ADDED_MIN_SIMILARITY for o in others)


def added_condition(new: str, old: str, similarity: WordSimilarity | None) -> str | None:
    """A content word inserted into one prompt where the other has nothing ("make coffee" /
    "make coffee *without a machine*", "an egg" / "a *boiled* egg"). A replacement is a
    rephrasing ("why is" / "what makes", "who" / "which artist") or a swap
    (`lexical.swapped_words`), not an added condition."""
    a = [w for w in norm_words(old) if w not in ARTICLES]
    b = [w for w in norm_words(new) if w not in ARTICLES]
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    for n, (op, i1, i2, j1, j2) in enumerate(ops):
        if op not in ("insert", "delete") or not _clean(ops, n):
            continue
        words, before, other = (b[j1:j2], b[:j1], a) if op == "insert" else (a[i1:i2], a[:i1], b)
        if _DO & set(before) - set(other):
            continue  # "are in a banana" / "does a banana contain": do-support's main verb
        context = [w for w in other if w not in STOP]
        asked = _how_measures(other)
        if (
            before
            and before[-1] in _names(new + " " + old)
            and len(words) == 1
            and not words[0].endswith("ly")  # "in Java *recursively*": a manner, a condition
        ):
            continue  # "the Vim *editor*", "a Word *document*": what the name is, not a condition
        for k, w in enumerate(words):
            prev = (before + words[:k])[-1:] or [""]
            if w in STOP or w in _FRAME or w in _SCOPE or w in _TIME or prev[0] in _ASKING:
                continue  # frame words pass; scope, time and "how long" have their own checks
            if _MEASURE_NOUNS.get(w) in asked:
                continue  # "what is the length" / "how long": the same measure
            if not _related(w, context, similarity):
                return f"{'added' if op == 'insert' else 'dropped'} '{w}'"
    return None


def _names(text: str) -> set[str]:
    """Capitalized words that are not function words: names ("Vim", "Word", "SQL")."""
    return {w.lower() for w in re.findall(r"\b[A-Z][A-Za-z0-9+#]*", text)} - STOP


def _clean(ops: list[tuple[str, int, int, int, int]], n: int) -> bool:
    """An insertion between unchanged words: beside another change it is part of a
    rephrasing ("are in a banana" / "does a banana contain")."""
    for side in (-1, 1):
        m = n + side
        if not 0 <= m < len(ops):
            continue
        op, i1, i2, _, _ = ops[m]
        if op != "equal":
            return False
        if i2 - i1 <= 2 and 0 <= m + side < len(ops):
            return False  # one or two words from another change: "what makes the sky look"
    return True


_DO = {"do", "does", "did"}
# The noun of what "how <adjective>" asks: "how long" / "the length".
_MEASURE_NOUNS = {
    "length": "length",
    "age": "age",
    "distance": "distance",
    "height": "height",
    "speed": "speed",
    "weight": "weight",
    "size": "size",
    "depth": "depth",
    "width": "width",
    "temperature": "temperature",
    "price": "price",
    "cost": "price",
}


def _how_measures(words: list[str]) -> set[str]:
    """Scales asked by "how <adjective>" ("how long" -> length)."""
    return {
        scale
        for i, w in enumerate(words[:-1])
        if w == "how"
        for scale in measure_scales(words[i + 1])
    }


# A word right after these is part of the question, not a condition: "which *scientist*",
# "how *long*" (question_types compares those).
_ASKING = {"which", "what", "whose", "how"}
