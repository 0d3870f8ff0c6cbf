"""Sentence splitting, protected spans, language detection and routing: no models."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.mt.registry import Registry, model_specs, parse_pair
from services.mt.text import (
    Terms,
    detect_language,
    has_words,
    join_sentences,
    protect,
    split_sentences,
)


def sentences(text: str, max_chars: int = 400) -> list[str]:
    leading, found = split_sentences(text, max_chars)
    assert join_sentences(leading, found, [s.text for s in found]) == text
    return [s.text for s in found]


def test_splits_at_sentence_ends_and_line_breaks() -> None:
    text = "  Hello there. How are you?  Fine!\n\nNew paragraph…  Last one.\n"
    assert sentences(text) == [
        "Hello there.",
        "How are you?",
        "Fine!",
        "New paragraph…",
        "Last one.",
    ]


def test_keeps_abbreviations_initials_decimals_and_quotes_inside_a_sentence() -> None:
    assert sentences(
        'Dr. Silva met J. Smith at 3.5 km, e.g. near www.x.com. He said "ok." Bye.'
    ) == [
        "Dr. Silva met J. Smith at 3.5 km, e.g. near www.x.com.",
        'He said "ok."',
        "Bye.",
    ]
    assert sentences("¿Qué? «Sim.» (Then) left.") == ["¿Qué?", "«Sim.»", "(Then) left."]


def test_long_sentences_are_cut_at_clauses_then_words() -> None:
    clause = "one two three four five six seven eight nine ten"
    text = f"{clause}, {clause}; {clause} {clause} {clause}."
    parts = sentences(text, max_chars=80)
    assert parts[:2] == [f"{clause},", f"{clause};"]
    assert all(len(part) <= 80 for part in parts)
    assert " ".join(parts) == text
    unbroken = "x" * 130
    assert sentences(unbroken, max_chars=60) == ["x" * 60, "x" * 60, "x" * 10]


def test_whitespace_only_text_has_no_sentences() -> None:
    assert split_sentences(" \n ", 100) == (" \n ", [])


def test_urls_emails_and_numbers_become_placeholders() -> None:
    protected = protect(
        "Pay $1,299.99 by 12/05/2024 to bob.smith@example.com, see https://ex.com/a?b=1."
    )
    assert protected.masked == "Pay $[0] by [1] to [2], see [3]."
    assert protected.spans == (
        "1,299.99",
        "12/05/2024",
        "bob.smith@example.com",
        "https://ex.com/a?b=1",
    )
    assert protected.restore("Pague $[0] até [1] para [2], veja [3].") == (
        "Pague $1,299.99 até 12/05/2024 para bob.smith@example.com, veja https://ex.com/a?b=1."
    )


def test_spaced_digit_groups_are_one_span() -> None:
    protected = protect("Call +55 11 98765-4321 or 0800 123 4567, then 3 more.")
    assert protected.spans == ("+55 11 98765-4321", "0800 123 4567", "3")


def test_numbers_inside_words_are_left_to_the_model() -> None:
    assert protect("The 3rd COVID19 wave.").masked == "The 3rd COVID19 wave."


def test_glossary_and_kept_terms_match_whole_words_ignoring_case() -> None:
    terms = Terms({"acme": "ACME Ltda"}, ["Maria", "art"])
    protected = protect("ACME hired Maria for the party art show.", terms)
    assert protected.masked == "[0] hired [1] for the party [2] show."
    assert protected.spans == ("ACME Ltda", "Maria", "art")


def test_urls_win_over_terms_and_numbers_inside_them() -> None:
    protected = protect("Open www.acme.com/2024 now", Terms({"acme": "X"}, []))
    assert protected.spans == ("www.acme.com/2024",)


def test_restore_refuses_lost_or_duplicated_placeholders() -> None:
    protected = protect("Call 555 or 777 now.")
    assert protected.restore("Ligue [0] ou agora.") is None
    assert protected.restore("Ligue [0] ou [0] agora.") is None
    assert protected.restore("Ligue [0] ou [1] [2] agora.") is None
    assert protected.restore("Ligue [1] ou [0] agora.") == "Ligue 777 ou 555 agora."


def test_pieces_join_around_the_spans() -> None:
    protected = protect("Send it to bob@example.com before noon.")
    assert protected.pieces == ("Send it to ", " before noon.")
    joined = protected.join(["Envie para", "antes do meio-dia."])
    assert joined == "Envie para bob@example.com antes do meio-dia."
    assert not has_words(protect("42 - 7").masked)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The meeting was moved to Thursday afternoon.", "en"),
        ("A reunião foi cancelada por causa da chuva.", "pt"),
        ("Não esqueça de levar o passaporte.", "pt"),
        ("Could you send me the report?", "en"),
        ("OK", None),
        ("Lisboa, Porto, Recife", None),
    ],
)
def test_detects_english_and_portuguese_or_says_it_cannot(text: str, expected: str | None) -> None:
    assert detect_language(text, ["en", "pt"]) == expected


def test_detection_only_considers_the_candidates() -> None:
    text = "El gato duerme en el sofá y la casa está vacía."
    assert detect_language(text, ["en", "pt", "es"]) == "es"
    assert detect_language(text, ["en"]) is None


def test_pairs_and_routes() -> None:
    assert parse_pair("eng_Latn-por_Latn") == ("en", "pt")
    for bad in ("en", "en-en", "en-pt-br", "english-pt"):
        with pytest.raises(ValueError):
            parse_pair(bad)
    specs = model_specs(
        {"en-pt": Path("/m/bergamot-en-pt"), "pt-en": Path("/m/bergamot-pt-en")},
        {"es-en": Path("/m/multi"), "es-fr": Path("/m/multi")},
    )
    assert [(s.name, s.pairs) for s in specs][-1] == ("multi", (("es", "en"), ("es", "fr")))
    registry = Registry(specs, "en")
    routes = [(r.source, r.target, r.models, r.pivot) for r in registry.routes()]
    assert routes == [
        ("en", "pt", ["bergamot-en-pt"], None),
        ("es", "en", ["multi"], None),
        ("es", "fr", ["multi"], None),
        ("pt", "en", ["bergamot-pt-en"], None),
        ("es", "pt", ["multi", "bergamot-en-pt"], "en"),
    ]
    assert registry.route("pt", "es") is None
    with pytest.raises(ValueError, match="twice"):
        model_specs({"en-pt": Path("/a")}, {"en-pt": Path("/b")})
    with pytest.raises(ValueError, match="share the name"):
        model_specs({"en-pt": Path("/a/m")}, {"es-en": Path("/b/m")})
