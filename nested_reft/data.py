"""Math datasets as GRPO rows: `prompt` (system + user chat messages) and `solution` (gold answer).

`load_math_dataset` reads GSM8K, MATH (hendrycks), SVAMP, any question/answer table, or the
embedded synthetic arithmetic set, from a local file, a local folder of split files, or a Hub id.
Every row becomes ``{"prompt": [{"role": "system", ...}, {"role": "user", ...}], "solution": str}``,
the columns TRL's GRPOTrainer passes to the reward functions.
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets

from archs.tiny.math_task import LEVEL_WEIGHTS, LEVELS, SYSTEM_PROMPT, as_chat, generate_problems

FORMATS = ("gsm8k", "math", "svamp", "generic", "synthetic")
LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
SYNTHETIC_SIZES = {"train": 2000, "test": 200}
HUB_FORMATS = {
    "openai/gsm8k": "gsm8k",
    "gsm8k": "gsm8k",
    "hendrycks/competition_math": "math",
    "eleutherai/hendrycks_math": "math",
    "competition_math": "math",
    "hendrycks_math": "math",
    "lighteval/math": "math",
    "chilled/svamp": "svamp",
    "svamp": "svamp",
}
HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}


def load_math_dataset(
    name_or_path: str,
    split: str = "train",
    *,
    format: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    config: str | None = None,
    levels: tuple[int, ...] | None = None,
) -> datasets.Dataset:
    """Load a math dataset as rows with `prompt` (chat messages) and `solution` (gold answer).

    name_or_path: "synthetic", a local file (.jsonl/.json/.parquet/.csv; `split` is then
    ignored), a local folder holding files whose name contains `split` (searched recursively;
    a `main/` subfolder wins over siblings, as in the GSM8K layout), or a Hub id.
    format: one of FORMATS; None infers it from the Hub id or the columns. Passing
    question_field/answer_field without a format selects "generic".
    limit: keep the first `limit` rows (after a shuffle with `seed` when `shuffle` is True).
    config: the Hub config name, or a subfolder of a local folder (defaults: "main" for GSM8K).
    MATH rows keep `level`/`type` columns; synthetic rows carry `level` and `key`.
    levels: synthetic only, the levels to draw (in the task's relative weights); default all five.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid formats are {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit!r}")
    if format is None and (question_field or answer_field):
        format = "generic"
    if name_or_path == "synthetic" or format == "synthetic":
        rows = synthetic_rows(split, system_prompt, limit, seed, levels=levels)
    else:
        raw, hub_format = _load_raw(name_or_path, split, config)
        if len(raw) == 0:
            raise ValueError(f"dataset {name_or_path!r} (split {split!r}) is empty")
        if shuffle:
            raw = raw.shuffle(seed=seed)
        if limit is not None:
            raw = raw.select(range(min(limit, len(raw))))
        format = format or hub_format or infer_format(raw)
        rows = _convert(raw, format, question_field or "question", answer_field or "answer", system_prompt)
    if not rows:
        raise ValueError(f"dataset {name_or_path!r} (split {split!r}) is empty")
    return datasets.Dataset.from_list(rows)


def holdout_split(ds: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out) from one table, deterministically: a row is held out when the hash of
    its question text falls in the first `fraction` of the hash range. The same question (a
    duplicate row) always lands on the same side, whatever the order, the seed or the machine."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction!r}")
    import hashlib

    def held_out(row) -> bool:
        question = row["prompt"][-1]["content"].strip()
        return int(hashlib.sha256(question.encode()).hexdigest()[:15], 16) < fraction * 16**15

    flags = [held_out(r) for r in ds]
    train = ds.select([i for i, f in enumerate(flags) if not f])
    test = ds.select([i for i, f in enumerate(flags) if f])
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"holdout_fraction={fraction} of {len(ds)} rows leaves an empty train or held-out "
                         "part: use a larger dataset, another fraction, or a separate eval file")
    return train, test


def synthetic_rows(split: str, system_prompt: str = SYSTEM_PROMPT, n: int | None = None, seed: int = 0,
                   levels: tuple[int, ...] | None = None) -> list[dict]:
    """Rows of the embedded synthetic arithmetic set (split 'train' or 'test').

    n defaults to SYNTHETIC_SIZES[split]; test problems never repeat a key. `levels`: a subset of
    the five levels, mixed in the task's relative weights (LEVEL_WEIGHTS) when the task draws each
    of them, evenly otherwise; default the task's own mix.
    """
    if split not in SYNTHETIC_SIZES:
        raise ValueError(f"synthetic split must be one of {sorted(SYNTHETIC_SIZES)}, got {split!r}")
    size = SYNTHETIC_SIZES[split] if n is None else n
    levels = tuple(levels) if levels else LEVELS
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"unknown synthetic levels {bad}; levels are {LEVELS}")
    weights = tuple(LEVEL_WEIGHTS[LEVELS.index(lv)] for lv in levels)
    if not all(weights):  # a level the task's own mix leaves out: draw the asked levels evenly
        weights = None
    problems = generate_problems(size, split, seed, levels=levels, level_weights=weights, unique=split == "test")
    return [
        {"prompt": as_chat(p, system_prompt), "solution": p.answer, "level": p.level, "key": p.key}
        for p in problems
    ]


def infer_format(ds: datasets.Dataset) -> str:
    """Guess the format from the columns: svamp, math, gsm8k (answers with '####'), else generic."""
    cols = set(ds.column_names)
    if {"Body", "Question", "Answer"} <= cols:
        return "svamp"
    if {"problem", "solution"} <= cols:
        return "math"
    if {"question", "answer"} <= cols:
        sample = ds.select(range(min(100, len(ds))))["answer"]
        if sample and all("####" in str(a) for a in sample):
            return "gsm8k"
    return "generic"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in text (balanced braces), or None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def gsm8k_answer(answer: str) -> str | None:
    """The final GSM8K answer: text after the last '####', commas removed; None without '####'."""
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def plain_number(value) -> str:
    """A number as plain text: 8.0 -> '8', 2.5 -> '2.5', '12' -> '12'."""
    x = float(value)
    return str(int(x)) if x.is_integer() else repr(x)


# --------------------------------------------------------------------------- loading


def _load_raw(name_or_path: str, split: str, config: str | None) -> tuple[datasets.Dataset, str | None]:
    """The raw table and, for a known Hub id, its format."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _read_files([path]), None
    if path.is_dir():
        return _read_files(_split_files(path / config if config else path, split)), None
    if path.suffix.lower() in LOADERS or name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no such file or folder: {name_or_path!r}")
    key = name_or_path.lower()
    try:
        raw = datasets.load_dataset(name_or_path, config or HUB_CONFIGS.get(key), split=split)
    except Exception as e:  # offline, unknown id, bad config...: one message with the cause
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local file or folder, and could not be loaded as a "
            f"Hub dataset (split {split!r}): {type(e).__name__}: {e}"
        ) from e
    return raw, HUB_FORMATS.get(key)


def _split_files(folder: Path, split: str) -> list[Path]:
    """The data files for `split` under folder: names containing the split, one folder only."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {str(folder)!r}")
    data = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS)
    found = [p for p in data if split in p.name]
    if not found:
        listing = ", ".join(str(p.relative_to(folder)) for p in data) or "no data files"
        raise FileNotFoundError(f"no file for split {split!r} in {str(folder)!r}; found: {listing}")
    depth = min(len(p.parent.parts) for p in found)
    parents = sorted({p.parent for p in found if len(p.parent.parts) == depth})
    if len(parents) > 1:
        if not any(d.name == "main" for d in parents):
            dirs = ", ".join(str(d.relative_to(folder)) for d in parents)
            raise ValueError(f"split {split!r} has files in several folders of {str(folder)!r} ({dirs}); pass config=<folder>")
        parents = [d for d in parents if d.name == "main"]
    found = [p for p in found if p.parent == parents[0]]
    ext = min((p.suffix.lower() for p in found), key=list(LOADERS).index)
    return [p for p in found if p.suffix.lower() == ext]


def _read_files(files: list[Path]) -> datasets.Dataset:
    """Read local data files with the matching `datasets` loader."""
    loader = LOADERS.get(files[0].suffix.lower())
    if loader is None:
        raise ValueError(f"unsupported file type {files[0].suffix!r} for {str(files[0])!r}; use one of {', '.join(LOADERS)}")
    names = ", ".join(repr(str(f)) for f in files)
    if all(not f.read_bytes().strip() for f in files):
        raise ValueError(f"dataset {names} is empty")
    kwargs = {}
    if loader == "csv":  # keep cells as written: "4", not 4.0 from a column mixing ints and floats
        with open(files[0], newline="") as f:
            header = next(csv.reader(f), [])
        kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in header})
    try:
        return datasets.load_dataset(loader, data_files={"train": [str(f) for f in files]}, split="train", **kwargs)
    except Exception as e:
        if "corresponds to no data" in str(e):
            raise ValueError(f"dataset {names} is empty") from e
        raise ValueError(f"could not read {names} as {loader}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- conversion


def _require(ds: datasets.Dataset, *fields: str) -> None:
    for field in fields:
        if field not in ds.column_names:
            raise ValueError(f"field {field!r} is missing from the data; columns present: {ds.column_names}")


def _convert(ds: datasets.Dataset, format: str, q_field: str, a_field: str, system_prompt: str) -> list[dict]:
    """Map raw rows of the given format to prompt/solution rows."""

    def chat(question: str) -> list[dict]:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]

    rows = []
    if format == "gsm8k":
        _require(ds, "question", "answer")
        for i, r in enumerate(ds):
            gold = gsm8k_answer(str(r["answer"]))
            if gold is None:
                raise ValueError(f"GSM8K row {i}: answer has no '####' final answer: {r['answer']!r}")
            rows.append({"prompt": chat(r["question"]), "solution": gold})
    elif format == "math":
        _require(ds, "problem", "solution")
        extra = [c for c in ("level", "type") if c in ds.column_names]
        for i, r in enumerate(ds):
            gold = last_boxed(str(r["solution"]))
            if gold is None:
                raise ValueError(f"MATH row {i}: solution has no \\boxed{{}} answer")
            rows.append({"prompt": chat(r["problem"]), "solution": gold, **{c: r[c] for c in extra}})
    elif format == "svamp":
        _require(ds, "Body", "Question", "Answer")
        for r in ds:
            question = f"{str(r['Body']).strip()} {str(r['Question']).strip()}"
            rows.append({"prompt": chat(question), "solution": plain_number(r["Answer"])})
    else:
        _require(ds, q_field, a_field)
        rows = [{"prompt": chat(str(r[q_field])), "solution": str(r[a_field])} for r in ds]
    return rows
