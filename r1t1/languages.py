"""Language codes and names: ISO 639-1, Flores-101 (ISO 639-3) and Flores-200 (`xxx_Script`).

`language("de")`, `language("deu")`, `language("deu_Latn")` and `language("German")` all give the
same `Language`; the authors' tags (`kr` for Korean) and names (`Malaysian`, `Turkey`) are aliases. Unknown names fail with one error that names the value and the known codes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    code: str  # short code used in direction names ("de-en") and prompts' bookkeeping
    flores101: str  # Flores-101 file stem, e.g. "deu" (deu.devtest)
    flores200: str  # Flores-200 file stem, e.g. "deu_Latn" (deu_Latn.devtest)
    name: str  # English name, shown to the model in prompts
    aliases: tuple[str, ...] = ()  # other tags accepted for it (the authors' `kr` for Korean)


# The toy language of the embedded default (archs/tiny/translation_task.py). `qtl` sits in
# ISO 639's private-use range (qaa–qtz), so it can never clash with a real language.
TOY = Language("qtl", "qtl", "qtl_Latn", "Toylang")

_TABLE = [
    ("en", "eng", "eng_Latn", "English"), ("de", "deu", "deu_Latn", "German"),
    ("fr", "fra", "fra_Latn", "French"), ("es", "spa", "spa_Latn", "Spanish"),
    ("it", "ita", "ita_Latn", "Italian"), ("pt", "por", "por_Latn", "Portuguese"),
    ("nl", "nld", "nld_Latn", "Dutch"), ("sv", "swe", "swe_Latn", "Swedish"),
    ("da", "dan", "dan_Latn", "Danish"), ("fi", "fin", "fin_Latn", "Finnish"),
    ("pl", "pol", "pol_Latn", "Polish"), ("cs", "ces", "ces_Latn", "Czech"),
    ("ro", "ron", "ron_Latn", "Romanian"), ("hu", "hun", "hun_Latn", "Hungarian"),
    ("el", "ell", "ell_Grek", "Greek"), ("ru", "rus", "rus_Cyrl", "Russian"),
    ("uk", "ukr", "ukr_Cyrl", "Ukrainian"), ("tr", "tur", "tur_Latn", "Turkish", ("Turkey",)),
    ("ar", "ara", "arb_Arab", "Arabic"), ("he", "heb", "heb_Hebr", "Hebrew"),
    ("hi", "hin", "hin_Deva", "Hindi"), ("bn", "ben", "ben_Beng", "Bengali"),
    ("zh", "zho_simpl", "zho_Hans", "Chinese"), ("zt", "zho_trad", "zho_Hant", "Traditional Chinese"),
    ("ja", "jpn", "jpn_Jpan", "Japanese"), ("ko", "kor", "kor_Hang", "Korean", ("kr",)),
    ("vi", "vie", "vie_Latn", "Vietnamese"), ("th", "tha", "tha_Thai", "Thai"),
    ("id", "ind", "ind_Latn", "Indonesian"), ("ms", "msa", "zsm_Latn", "Malay", ("Malaysian",)),
    ("tl", "tgl", "tgl_Latn", "Tagalog", ("fil", "Filipino")),
    ("sw", "swh", "swh_Latn", "Swahili"), ("fa", "fas", "pes_Arab", "Persian"),
]
LANGUAGES: tuple[Language, ...] = tuple(Language(*row) for row in _TABLE) + (TOY,)

# The 21 languages of the paper's Flores-101 evaluation, in the released script's order (its
# `kr` is our `ko`), its two pivots, and the six languages of the released training data.
PAPER_LANGUAGES = ("ar", "de", "es", "fr", "it", "ja", "ko", "pt", "ru", "th", "tr",
                   "en", "zh", "nl", "pl", "ms", "id", "el", "cs", "vi", "tl")
PAPER_PIVOTS = ("en", "zh")
PAPER_SEEN_LANGUAGES = ("en", "zh", "fr", "de", "ru", "ja")

_INDEX: dict[str, Language] = {}
for _lang in LANGUAGES:
    for _key in (_lang.code, _lang.flores101, _lang.flores200, _lang.name, *_lang.aliases):
        _INDEX[_key.lower()] = _lang


def language(name: str | Language) -> Language:
    """The `Language` for a code (ISO 639-1, Flores-101, Flores-200) or an English name."""
    if isinstance(name, Language):
        return name
    if not isinstance(name, str) or name.strip().lower() not in _INDEX:
        known = ", ".join(lang.code for lang in LANGUAGES)
        raise ValueError(f"unknown language {name!r}; known codes: {known} "
                         "(Flores-101/200 codes and English names are accepted too)")
    return _INDEX[name.strip().lower()]


def language_name(name: str | Language) -> str:
    return language(name).name
