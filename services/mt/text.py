"""Text around the model: sentence splitting, protected spans, and language detection.

Protected spans (URLs, emails, numbers, glossary and do-not-translate terms) are replaced
by placeholders `[0]`, `[1]`, ... before the model and restored after it. The Bergamot
students copy bracketed indexes through unchanged (checked on both directions, greedy and
beam, with up to five in a sentence), while other shapes tried (`{0}`, `<0>`, `@0`, `§0`,
`__0__`) are mangled. A model that drops or duplicates a placeholder anyway is caught by
`Protected.restore`; the caller then translates the text between the spans on its own and
keeps the spans verbatim (`Protected.pieces`), which always preserves them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# --- sentences ---------------------------------------------------------------------------

# A sentence ends at . ! ? or … (plus closing quotes/brackets), before whitespace and
# something that can start a sentence; the whitespace is the gap between the two.
_CLOSERS = "\"'\u201d\u2019\u00bb)]"
_OPENERS = "\"'\u201c\u2018\u00ab([\u00bf\u00a1"
_BOUNDARY = re.compile(
    rf"[.!?\u2026][{re.escape(_CLOSERS)}]*(?P<gap>\s+)(?=[{re.escape(_OPENERS)}]*\w)"
)
_LINE_BREAK = re.compile(r"(?P<gap>\s*\n\s*)")
# Words whose trailing period is not a sentence end (English and Portuguese).
_ABBREVIATIONS = frozenset(
    {
        *("mr", "mrs", "ms", "dr", "drs", "dra", "prof", "profa", "sr", "sra", "srta", "jr"),
        *("st", "vs", "etc", "e.g", "i.e", "p.ex", "ex", "no", "nº", "n.º", "av", "fig"),
        *("vol", "cap", "pág", "pp", "approx", "aprox", "co", "corp", "inc", "ltd"),
    }
)
_CLAUSE = re.compile(r"(?<=[,;:])\s+")


@dataclass(frozen=True)
class Sentence:
    text: str
    # Whitespace that followed it in the original, put back after its translation.
    trailing: str


def split_sentences(text: str, max_chars: int) -> tuple[str, list[Sentence]]:
    """Splits `text` into sentences; returns the leading whitespace and the sentences.

    Line breaks always end a sentence. Sentences longer than `max_chars` are cut at
    clause punctuation, else between words, else anywhere. Joining the leading
    whitespace and each sentence's text + trailing gives `text` back.
    """
    body = text.strip()
    leading = text[: len(text) - len(text.lstrip())]
    if not body:
        return text, []
    sentences: list[Sentence] = []
    for line, line_gap in _split(body, _LINE_BREAK):
        for sentence, gap in _split(line, _BOUNDARY, _is_sentence_end):
            sentences += _cut(sentence, gap, max_chars)
        last = sentences[-1]
        sentences[-1] = Sentence(last.text, last.trailing + line_gap)
    last = sentences[-1]
    sentences[-1] = Sentence(last.text, last.trailing + text[len(leading) + len(body) :])
    return leading, sentences


def _split(
    text: str,
    separator: re.Pattern[str],
    accept: Callable[[str, re.Match[str]], bool] = lambda text, match: True,
) -> list[tuple[str, str]]:
    """(piece, gap after it) pairs at the `gap` group of each accepted separator match."""
    out: list[tuple[str, str]] = []
    start = 0
    for match in separator.finditer(text):
        if accept(text, match):
            out.append((text[start : match.start("gap")], match.group("gap")))
            start = match.end("gap")
    out.append((text[start:], ""))
    return out


def _is_sentence_end(text: str, match: re.Match[str]) -> bool:
    before = text[: match.start("gap")].rstrip(_CLOSERS)
    if not before.endswith("."):
        return True
    words = before[:-1].split()
    word = words[-1].lower() if words else ""
    # An initial ("J. Smith") or a known abbreviation ("Dr. Silva") does not end one.
    return not (len(word) == 1 and word.isalpha()) and word not in _ABBREVIATIONS


def _cut(sentence: str, trailing: str, max_chars: int) -> list[Sentence]:
    if len(sentence) <= max_chars:
        return [Sentence(sentence, trailing)]
    head = sentence[:max_chars]
    cut = max((m.end() for m in _CLAUSE.finditer(head)), default=0)
    if cut < max_chars // 2:
        space = head.rfind(" ")
        cut = space + 1 if space > max_chars // 2 else max_chars
    first, rest = sentence[:cut], sentence[cut:]
    gap = first[len(first.rstrip()) :]
    return [Sentence(first.rstrip(), gap), *_cut(rest, trailing, max_chars)]


def join_sentences(leading: str, sentences: Sequence[Sentence], translated: Sequence[str]) -> str:
    return leading + "".join(
        text + sentence.trailing for sentence, text in zip(sentences, translated, strict=True)
    )


# --- protected spans ---------------------------------------------------------------------

_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'`]+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
# Digits with their inner separators (1,299.99 12/05/2024 7:30 10-20), not inside a word;
# groups split by single spaces stay one span (+55 11 98765-4321), since the model may
# drop the space between two placeholders.
_NUMBER = re.compile(r"(?<!\w)\+?\d+(?:[.,:/\- ]\d+)*(?!\w)")
_URL_TAIL = ".,;:!?)]}'\""
_PLACEHOLDER = re.compile(r"\[(\d+)\]")


class Terms:
    """What a request asks to keep: glossary source terms, each replaced by its forced
    translation, and terms copied unchanged. Matched whole-word, ignoring case."""

    def __init__(self, glossary: Mapping[str, str], keep: Sequence[str]) -> None:
        self._replacements = {source.casefold(): target for source, target in glossary.items()}
        terms = sorted({*glossary, *keep}, key=len, reverse=True)
        alternatives = "|".join(re.escape(term) for term in terms)
        # Longest first, and whole words only, so the term "art" leaves "party" alone.
        self.pattern = (
            re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if terms else None
        )

    def replacement(self, matched: str) -> str:
        return self._replacements.get(matched.casefold(), matched)


NO_TERMS = Terms({}, ())


@dataclass(frozen=True)
class Protected:
    """A sentence with its protected spans replaced by placeholders."""

    masked: str
    # What placeholder [i] becomes in the translation.
    spans: tuple[str, ...]
    # The text around the spans: len(spans) + 1 pieces, for translating without placeholders.
    pieces: tuple[str, ...]

    def restore(self, translated: str) -> str | None:
        """The translation with the spans put back; None when the model did not copy every
        placeholder exactly once."""
        found = [int(index) for index in _PLACEHOLDER.findall(translated)]
        if sorted(found) != list(range(len(self.spans))):
            return None
        return _PLACEHOLDER.sub(lambda m: self.spans[int(m.group(1))], translated)

    def join(self, translated_pieces: Sequence[str]) -> str:
        """Translated pieces (one per piece) interleaved with the spans, spacing kept."""
        out = []
        for index, (piece, text) in enumerate(zip(self.pieces, translated_pieces, strict=True)):
            if text:
                lead = piece[: len(piece) - len(piece.lstrip())]
                tail = piece[len(piece.rstrip()) :]
                out.append(lead + text + tail)
            else:
                out.append(piece)
            if index < len(self.spans):
                out.append(self.spans[index])
        return "".join(out)


def protect(sentence: str, terms: Terms = NO_TERMS) -> Protected:
    """Finds the spans to keep (URLs and emails first, then the request's terms, then
    numbers; earlier kinds win where they overlap) and masks them."""
    claimed: list[tuple[int, int, str]] = []

    def claim(start: int, end: int, restored: str) -> None:
        if start < end and all(end <= s or start >= e for s, e, _ in claimed):
            claimed.append((start, end, restored))

    for match in _URL.finditer(sentence):
        url = match.group().rstrip(_URL_TAIL)
        claim(match.start(), match.start() + len(url), url)
    for match in _EMAIL.finditer(sentence):
        claim(match.start(), match.end(), match.group())
    if terms.pattern is not None:
        for match in terms.pattern.finditer(sentence):
            claim(match.start(), match.end(), terms.replacement(match.group()))
    for match in _NUMBER.finditer(sentence):
        claim(match.start(), match.end(), match.group())
    claimed.sort()
    masked, pieces, position = [], [], 0
    for index, (start, end, _) in enumerate(claimed):
        pieces.append(sentence[position:start])
        masked += [sentence[position:start], f"[{index}]"]
        position = end
    pieces.append(sentence[position:])
    masked.append(sentence[position:])
    return Protected("".join(masked), tuple(span for *_, span in claimed), tuple(pieces))


def has_words(text: str) -> bool:
    """Whether a model has anything to translate (placeholders and numbers alone do not)."""
    return any(ch.isalpha() for ch in text)


# --- language detection ------------------------------------------------------------------

# The most frequent function words of each language. A text is scored by how many of its
# words each list holds, plus letters only one candidate uses; the best language wins only
# by a clear margin. It is a heuristic for telling apart the few languages a deployment has
# models for, not a general language identifier: short or mixed texts come back undecided.
_FUNCTION_WORDS = {
    "en": "the a an and or of to in on at for with is are was were be been it this that "
    "you he she we they i my your not have has had do does did will would can from by as "
    "but if there what which who",
    "pt": "o a os as um uma uns umas e ou de do da dos das em no na nos nas por para com "
    "é são foi eram ser está estão não que se eu ele ela nós eles elas você meu minha seu "
    "sua mais mas como ao à pelo pela também",
    "es": "el la los las un una unos unas y o de del en por para con es son fue ser está "
    "están no que se yo él ella nosotros ellos usted mi su más pero como al también muy",
    "fr": "le la les un une des et ou de du en au aux par pour avec est sont était être "
    "pas que qui se je il elle nous vous ils mon ma son sa plus mais comme aussi très",
    "de": "der die das ein eine und oder von zu in im auf für mit ist sind war sein "
    "nicht dass sich ich er sie wir ihr mein dein sein mehr aber wie auch sehr den dem",
    "it": "il lo la gli le un una e o di del della in nel per con è sono era essere non "
    "che si io lui lei noi voi loro mio mia suo sua più ma come anche molto",
}
_LETTERS = {"pt": "ãõ", "es": "ñ¿¡", "de": "ßäöü", "fr": "œùû", "it": "ì"}
_WORDS = {lang: frozenset(words.split()) for lang, words in _FUNCTION_WORDS.items()}
_WORD = re.compile(r"[^\W\d_]+")


def detect_language(text: str, candidates: Sequence[str]) -> str | None:
    """The candidate language `text` is written in, or None when it cannot be told."""
    words = [word.lower() for word in _WORD.findall(text)]
    scores = {
        lang: sum(word in _WORDS[lang] for word in words)
        + 2 * sum(text.count(letter) for letter in _LETTERS.get(lang, ""))
        for lang in candidates
        if lang in _WORDS
    }
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
    if not ranked or ranked[0][1] == 0:
        return None
    best, score = ranked[0]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    # A clear margin: at least twice the next language's score.
    return best if score >= 2 * runner_up and score > runner_up else None
