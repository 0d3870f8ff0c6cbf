"""Language codes: BCP-47 everywhere, NLLB-style codes (`eng_Latn`) accepted as aliases."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument, shown

# ISO 639-3 → 639-1 for the languages Whisper knows; NLLB codes use the 639-3 form.
_ISO3_TO_ISO1 = {
    "afr": "af",
    "amh": "am",
    "arb": "ar",
    "ara": "ar",
    "asm": "as",
    "aze": "az",
    "azj": "az",
    "bak": "ba",
    "bel": "be",
    "bul": "bg",
    "ben": "bn",
    "bod": "bo",
    "bre": "br",
    "bos": "bs",
    "cat": "ca",
    "ces": "cs",
    "cym": "cy",
    "dan": "da",
    "deu": "de",
    "ell": "el",
    "eng": "en",
    "spa": "es",
    "est": "et",
    "eus": "eu",
    "pes": "fa",
    "fas": "fa",
    "fin": "fi",
    "fao": "fo",
    "fra": "fr",
    "glg": "gl",
    "guj": "gu",
    "hau": "ha",
    "haw": "haw",
    "heb": "he",
    "hin": "hi",
    "hrv": "hr",
    "hat": "ht",
    "hun": "hu",
    "hye": "hy",
    "ind": "id",
    "isl": "is",
    "ita": "it",
    "jpn": "ja",
    "jav": "jw",
    "kat": "ka",
    "kaz": "kk",
    "khm": "km",
    "kan": "kn",
    "kor": "ko",
    "lat": "la",
    "ltz": "lb",
    "lin": "ln",
    "lao": "lo",
    "lit": "lt",
    "lvs": "lv",
    "lav": "lv",
    "mlg": "mg",
    "plt": "mg",
    "mri": "mi",
    "mkd": "mk",
    "mal": "ml",
    "khk": "mn",
    "mon": "mn",
    "mar": "mr",
    "zsm": "ms",
    "msa": "ms",
    "mlt": "mt",
    "mya": "my",
    "npi": "ne",
    "nep": "ne",
    "nld": "nl",
    "nno": "nn",
    "nob": "no",
    "nor": "no",
    "oci": "oc",
    "pan": "pa",
    "pol": "pl",
    "pbt": "ps",
    "pus": "ps",
    "por": "pt",
    "ron": "ro",
    "rus": "ru",
    "san": "sa",
    "snd": "sd",
    "sin": "si",
    "slk": "sk",
    "slv": "sl",
    "sna": "sn",
    "som": "so",
    "als": "sq",
    "sqi": "sq",
    "srp": "sr",
    "sun": "su",
    "swe": "sv",
    "swh": "sw",
    "swa": "sw",
    "tam": "ta",
    "tel": "te",
    "tgk": "tg",
    "tha": "th",
    "tuk": "tk",
    "tgl": "tl",
    "tur": "tr",
    "tat": "tt",
    "ukr": "uk",
    "urd": "ur",
    "uzn": "uz",
    "uzb": "uz",
    "vie": "vi",
    "ydd": "yi",
    "yid": "yi",
    "yor": "yo",
    "zho": "zh",
    "cmn": "zh",
    "yue": "yue",
}

_BCP47 = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_NLLB = re.compile(r"^([a-z]{3})_[A-Z][a-z]{3}$")


def normalize_language(code: str) -> str | None:
    """Returns the primary BCP-47 subtag (`pt` for `pt-BR`, `por_Latn` or `por`), lower case,
    or None when the text is not a language code at all."""
    code = code.strip()
    nllb = _NLLB.match(code)
    if nllb:
        return _ISO3_TO_ISO1.get(nllb.group(1))
    if not _BCP47.match(code):
        return None
    primary = code.split("-", 1)[0].lower()
    return _ISO3_TO_ISO1.get(primary, primary) if len(primary) == 3 else primary


def language_field(field: str, code: str, *, required: bool = False) -> str:
    """The normalized language of a request field, "" when unset and optional, or
    INVALID_ARGUMENT naming the field."""
    if not code:
        if required:
            raise InvalidArgument.field(field, "required (a BCP-47 code such as `pt`)")
        return ""
    normalized = normalize_language(code)
    if normalized is None:
        raise InvalidArgument.field(field, f"{shown(code)} is not a BCP-47 language code")
    return normalized
