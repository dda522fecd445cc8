"""Translation data: Flores folders, parallel TSV / JSONL, CoT corpora, and direction lists.

- Flores-101: `{root}/{split}/{lang}.{split}` with ISO 639-3 stems (`eng.devtest`);
  Flores-200: the same with `eng_Latn.devtest`; the released R1-T1 script's flat files
  `{root}/flores.{code}` (`flores.en`, `flores.kr`). One sentence per line, aligned across languages.
- Parallel TSV: `src<TAB>tgt` per line (an optional header `src\ttgt[\tsrc_lang\ttgt_lang]`).
- Parallel JSONL: objects with `src`, `tgt` and optional `src_lang`, `tgt_lang`.
- CoT JSONL (supervised cold start): `src`, `tgt`, `template`, `cot` (+ optional languages).
- The authors' released CoT corpus: a JSON array of `instruction`, `input`, `source_lang`,
  `target_lang`, `target_text`, `thought_chains`, `output` (`load_authors_cot`).
- The authors' harder test sets, as their evaluation script lays them out (`AUTHORS_HARD_SETS`:
  flat `{stem}.{lang}` files in one folder; the files themselves are not released) and CommonMT's
  public CSVs (`load_commonmt`: `chinese_source,english_target_correct,english_target_wrong`).

Every error names the file, the line and the bad value. Loaders return plain lists of dicts with
`src`, `tgt`, `src_lang`, `tgt_lang` (and `template`, `cot` for CoT corpora).
"""

from __future__ import annotations

import csv
import json
from itertools import permutations
from pathlib import Path

from .languages import PAPER_LANGUAGES, PAPER_PIVOTS, language
from .templates import TEMPLATE_NAMES, identify_template

FLORES_SPLITS = ("dev", "devtest")


# ------------------------------------------------------------------------------------ directions


def parse_direction(direction: str) -> tuple[str, str]:
    """'de-en', 'de→en', 'deu_Latn-eng_Latn' or ('de', 'en') → ('de', 'en') as short codes."""
    if isinstance(direction, (tuple, list)) and len(direction) == 2:
        src, tgt = direction
    elif isinstance(direction, str):
        for sep in ("→", "->", "-", ":"):
            if sep in direction:
                src, _, tgt = direction.partition(sep)
                break
        else:
            raise ValueError(f"direction {direction!r} must look like 'de-en' or 'de→en'")
    else:
        raise ValueError(f"direction {direction!r} must look like 'de-en' or 'de→en'")
    src_lang, tgt_lang = language(src.strip()), language(tgt.strip())
    if src_lang == tgt_lang:
        raise ValueError(f"direction {direction!r} translates a language into itself")
    return src_lang.code, tgt_lang.code


DIRECTION_MODES = ("xx-en", "en-xx", "both", "all", "paper")


def paper_directions(langs=PAPER_LANGUAGES, pivots=PAPER_PIVOTS) -> list[tuple[str, str]]:
    """The released evaluation grid: every non-pivot language into and out of each pivot, then the
    pivots into each other (21 languages, pivots en and zh: 19·2·2 + 2 = 78 directions)."""
    hubs = [language(p).code for p in pivots]
    others = [c for c in dict.fromkeys(language(lang).code for lang in langs) if c not in hubs]
    between = [(b, a) for a in hubs for b in hubs if a != b]  # zh-en, en-zh
    return [(c, h) for c in others for h in hubs] + [(h, c) for h in hubs for c in others] + between


def directions(langs=PAPER_LANGUAGES, mode: str = "xx-en", pivot: str = "en") -> list[tuple[str, str]]:
    """Direction lists: 'xx-en' (every language into the pivot), 'en-xx' (out of it), 'both',
    'all' (every ordered pair), or 'paper' (the released grid, pivots en and zh: `paper_directions`).
    `langs` may include the pivot; it is never paired with itself."""
    if mode == "paper":
        return paper_directions(langs)
    codes = list(dict.fromkeys(language(lang).code for lang in langs))
    hub = language(pivot).code
    others = [c for c in codes if c != hub]
    if mode == "xx-en":
        out = [(c, hub) for c in others]
    elif mode == "en-xx":
        out = [(hub, c) for c in others]
    elif mode == "both":
        out = [(c, hub) for c in others] + [(hub, c) for c in others]
    elif mode == "all":
        out = list(permutations(codes, 2))
    else:
        raise ValueError(f"direction mode must be one of {DIRECTION_MODES}, got {mode!r}")
    if not out:
        raise ValueError(f"no directions: languages {list(langs)!r} with mode {mode!r} and pivot {pivot!r}")
    return out


# ------------------------------------------------------------------------------------ Flores


def flores_file(root: str | Path, lang: str, split: str = "devtest") -> Path:
    """The Flores file of `lang` in `root`: Flores-200 name first, then Flores-101, then the code,
    then the released script's flat `flores.{code}` (its files are devtest; any alias, e.g. `kr`)."""
    if split not in FLORES_SPLITS:
        raise ValueError(f"Flores split must be one of {FLORES_SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Flores folder {str(root)!r} does not exist")
    lang_ = language(lang)
    tried = []
    for stem in dict.fromkeys((lang_.flores200, lang_.flores101, lang_.code)):
        for folder in (root / split, root):
            path = folder / f"{stem}.{split}"
            tried.append(str(path))
            if path.is_file():
                return path
    for tag in dict.fromkeys((lang_.code, *lang_.aliases)) if split == "devtest" else ():
        path = root / f"flores.{tag}"
        tried.append(str(path))
        if path.is_file():
            return path
    raise FileNotFoundError(f"no Flores file for {lang!r} ({split}); tried {', '.join(tried)}")


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _aligned_rows(src_path: Path, tgt_path: Path, src: str, tgt: str) -> list[dict]:
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(f"unequal line counts: {src_path} has {len(src_lines)} lines, {tgt_path} has {len(tgt_lines)}")
    if not src_lines:
        raise ValueError(f"{src_path} is empty")
    for path, lines in ((src_path, src_lines), (tgt_path, tgt_lines)):
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty:
            raise ValueError(f"{path}: line {empty[0]} is empty (one sentence per line)")
    return [{"src": s, "tgt": t, "src_lang": src, "tgt_lang": tgt} for s, t in zip(src_lines, tgt_lines)]


def load_flores(root: str | Path, direction, split: str = "devtest", limit: int | None = None) -> list[dict]:
    """Aligned sentence pairs of one direction from a Flores-101 or Flores-200 folder."""
    src, tgt = parse_direction(direction)
    rows = _aligned_rows(flores_file(root, src, split), flores_file(root, tgt, split), src, tgt)
    return rows[:limit] if limit is not None else rows


# ------------------------------------------------------------------------------------ parallel files


def _langs(row_src, row_tgt, src_lang, tgt_lang, where: str) -> tuple[str, str]:
    src, tgt = row_src or src_lang, row_tgt or tgt_lang
    if not src or not tgt:
        raise ValueError(f"{where}: no src_lang/tgt_lang in the row and none given to the loader")
    try:
        return parse_direction((src, tgt))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_parallel_tsv(path: str | Path, src_lang: str | None = None, tgt_lang: str | None = None) -> list[dict]:
    lines = read_lines(path)
    rows = []
    header = lines[0].split("\t") if lines else []
    start = 1 if header[:2] == ["src", "tgt"] else 0
    for i, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) not in (2, 4):
            raise ValueError(f"{path}:{i}: expected 2 tab-separated columns (src, tgt) or 4 (+ src_lang, tgt_lang), got {len(cols)}")
        if not cols[0].strip() or not cols[1].strip():
            raise ValueError(f"{path}:{i}: empty source or target")
        src, tgt = _langs(*(cols[2:4] if len(cols) == 4 else (None, None)), src_lang, tgt_lang, f"{path}:{i}")
        rows.append({"src": cols[0], "tgt": cols[1], "src_lang": src, "tgt_lang": tgt})
    if not rows:
        raise ValueError(f"{path} has no sentence pairs")
    return rows


def _jsonl_objects(path: str | Path):
    for i, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _text_field(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def load_parallel_jsonl(path: str | Path, src_lang: str | None = None, tgt_lang: str | None = None) -> list[dict]:
    rows = []
    for i, obj in _jsonl_objects(path):
        where = f"{path}:{i}"
        src, tgt = _langs(obj.get("src_lang"), obj.get("tgt_lang"), src_lang, tgt_lang, where)
        rows.append({"src": _text_field(obj, "src", where), "tgt": _text_field(obj, "tgt", where),
                     "src_lang": src, "tgt_lang": tgt})
    if not rows:
        raise ValueError(f"{path} has no sentence pairs")
    return rows


def load_cot_jsonl(path: str | Path, src_lang: str | None = None, tgt_lang: str | None = None) -> list[dict]:
    """A CoT corpus for the supervised cold start: rows with src, tgt, template, cot (+ languages)."""
    rows = []
    for i, obj in _jsonl_objects(path):
        where = f"{path}:{i}"
        src, tgt = _langs(obj.get("src_lang"), obj.get("tgt_lang"), src_lang, tgt_lang, where)
        template = obj.get("template")
        if template not in TEMPLATE_NAMES:
            raise ValueError(f"{where}: unknown template {template!r}; templates are {', '.join(TEMPLATE_NAMES)}")
        rows.append({"src": _text_field(obj, "src", where), "tgt": _text_field(obj, "tgt", where),
                     "src_lang": src, "tgt_lang": tgt, "template": template, "cot": _text_field(obj, "cot", where)})
    if not rows:
        raise ValueError(f"{path} has no examples")
    return rows


def load_authors_cot(path: str | Path, limit: int | None = None) -> list[dict]:
    """The authors' released CoT corpus (a JSON array): rows with `src`, `tgt`, `src_lang`, `tgt_lang`,
    `template` (identified from `thought_chains`; None when no pattern matches), `cot` (the think
    text), `completion` (their `output`, as released) and `prompt_text` (their `instruction` + input)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoT corpus {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of examples, got {type(data).__name__}")
    rows = []
    for i, obj in enumerate(data[:limit] if limit is not None else data):
        where = f"{path}: example {i}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        src, tgt = _langs(obj.get("source_lang"), obj.get("target_lang"), None, None, where)
        output = _text_field(obj, "output", where)
        think = output.split("<think>", 1)[-1].split("</think>", 1)[0].strip() if "</think>" in output else ""
        rows.append({"src": _text_field(obj, "input", where), "tgt": _text_field(obj, "target_text", where),
                     "src_lang": src, "tgt_lang": tgt,
                     "template": identify_template(obj.get("thought_chains") or ""),
                     "cot": think, "completion": output,
                     "prompt_text": f"{_text_field(obj, 'instruction', where).rstrip()}\n{obj['input']}"})
    if not rows:
        raise ValueError(f"{path} has no examples")
    return rows


# ------------------------------------------------------------------------------------ harder test sets

# The authors' evaluation script (evaluation/evaluate.py, `hard_task`) translates these flat source
# files of one folder: (test set, file stem, source, target); the source is `{stem}.{source}`. The
# files are not in their repository, and the script names no reference: the pairs it names
# (cul_en_es.en / cul_en_es.es, literature.en / literature.zh) say a reference is the same stem in
# the target language, which `load_flat_pair` reads (commonmt_la.en, term.de, ...).
AUTHORS_HARD_SETS = (
    ("commonmt_la", "commonmt_la", "zh", "en"), ("commonmt_cl_sa", "commonmt_cl_sa", "zh", "en"),
    ("commonmt_ct_sa", "commonmt_ct_sa", "zh", "en"), ("term", "term", "en", "de"),
    *(("cul", f"cul_en_{x}", "en", x) for x in ("es", "fr", "zh")),
    *(("cul", f"cul_en_{x}", x, "en") for x in ("es", "fr", "zh")),
    ("literature", "literature", "en", "zh"), ("literature", "literature", "zh", "en"),
)
# CommonMT (tjunlp-lab/CommonMT, Findings of EMNLP 2020): zh->en, one CSV per ambiguity type.
COMMONMT_FILES = {"commonmt_la": "lexical ambiguity.csv",
                  "commonmt_cl_sa": "contextless syntactic ambiguity.csv",
                  "commonmt_ct_sa": "contextual syntactic ambiguity.csv"}
COMMONMT_COLUMNS = ("chinese_source", "english_target_correct", "english_target_wrong")


def load_flat_pair(root: str | Path, stem: str, direction, limit: int | None = None) -> list[dict]:
    """Aligned pairs from `{root}/{stem}.{src}` and its reference `{root}/{stem}.{tgt}` (language
    tags as the authors write them: `kr` for Korean is found too)."""
    src, tgt = parse_direction(direction)
    root = Path(root)

    def path_of(code: str, role: str) -> Path:
        tags = dict.fromkeys((code, *language(code).aliases))
        for tag in tags:
            if (root / f"{stem}.{tag}").is_file():
                return root / f"{stem}.{tag}"
        raise FileNotFoundError(f"no {role} file {stem}.{code} in {str(root)!r}"
                                + (" (the authors' script names only source files: put each reference beside its "
                                   f"source as {stem}.{code}, one sentence per line)" if role == "reference" else ""))

    rows = _aligned_rows(path_of(src, "source"), path_of(tgt, "reference"), src, tgt)
    return rows[:limit] if limit is not None else rows


def authors_hard_sets(root: str | Path) -> list[tuple[str, str, str, str]]:
    """The entries of AUTHORS_HARD_SETS whose source file is in `root` (each needs its reference too)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"hard test set folder {str(root)!r} does not exist")
    found = [e for e in AUTHORS_HARD_SETS if (root / f"{e[1]}.{e[2]}").is_file()]
    if not found:
        names = ", ".join(dict.fromkeys(f"{stem}.{src}" for _, stem, src, _ in AUTHORS_HARD_SETS))
        raise FileNotFoundError(f"{str(root)!r} holds none of the authors' hard test set files ({names})")
    return found


def load_commonmt(path: str | Path, limit: int | None = None) -> list[dict]:
    """One CommonMT CSV: zh->en rows, the correct English as the reference (`wrong`: the contrastive
    translation the suite pairs it with)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CommonMT file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COMMONMT_COLUMNS[:2] if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: no column {missing[0]!r}; CommonMT files have {', '.join(COMMONMT_COLUMNS)} "
                                 f"(got {reader.fieldnames!r})")
            rows = []
            for i, r in enumerate(reader, 2):
                src, tgt = ((r.get(c) or "").strip() for c in COMMONMT_COLUMNS[:2])
                if not src or not tgt:
                    raise ValueError(f"{path}:{i}: empty {COMMONMT_COLUMNS[0] if not src else COMMONMT_COLUMNS[1]}")
                rows.append({"src": src, "tgt": tgt, "src_lang": "zh", "tgt_lang": "en",
                             "wrong": (r.get(COMMONMT_COLUMNS[2]) or "").strip()})
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows[:limit] if limit is not None else rows


def load_parallel(path: str | Path, src_lang: str | None = None, tgt_lang: str | None = None) -> list[dict]:
    """A parallel file by extension: .tsv or .jsonl."""
    suffix = Path(path).suffix.lower()
    if suffix == ".tsv":
        return load_parallel_tsv(path, src_lang, tgt_lang)
    if suffix in (".jsonl", ".json"):
        return load_parallel_jsonl(path, src_lang, tgt_lang)
    raise ValueError(f"{path}: unknown parallel format {suffix!r}; use .tsv or .jsonl")


def write_flores(root: str | Path, split: str, sentences: dict[str, list[str]], naming: str = "flores200") -> None:
    """Write aligned sentences as a Flores folder (`naming` 'flores200' or 'flores101')."""
    if naming not in ("flores200", "flores101"):
        raise ValueError(f"naming must be 'flores200' or 'flores101', got {naming!r}")
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    for lang, lines in sentences.items():
        stem = getattr(language(lang), naming)
        (folder / f"{stem}.{split}").write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
