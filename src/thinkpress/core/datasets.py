"""Datasets: the generated ``arith`` word problems, GSM8K, MATH-500 and generic JSONL.

Every loader has the signature ``loader(split, path=None, limit=None, seed=0, shuffle=False,
skip_invalid=False) -> list[Problem]``. File loaders read ``path`` (a JSONL file, or a directory
holding ``<split>.jsonl``). With no path, GSM8K reads the copy shipped as package data
(``thinkpress/data/gsm8k``, MIT, sha256-checked at every load), so the default runs evaluate on
real, human-written problems offline; other datasets read the Hub (only when online, through the
``datasets`` package). A malformed row is an error naming file and line unless ``skip_invalid``.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from thinkpress.core.data import Problem, iter_jsonl
from thinkpress.core.errors import DataError
from thinkpress.core.evaluation import gsm8k_gold

# --------------------------------------------------------------------------------------------
# arith: seeded one- to four-step word problems with exact integer answers
# --------------------------------------------------------------------------------------------

_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara"]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "books", "cookies", "shells", "stamps", "cards", "coins",
          "beads", "eggs", "flowers", "toy cars", "balloons", "oranges"]
_FRIENDS = ["a friend", "a neighbor", "a classmate", "a cousin", "a teacher", "a brother", "a sister"]

ARITH_SIZES = {"train": 2000, "test": 500}
_SPLIT_SALT = {"train": 11, "test": 7919}


def _arith_problem(rng: random.Random, idx: int, split: str) -> Problem:
    steps = 1 + idx % 4  # balanced difficulties 1..4
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    x = rng.randint(5, 60)
    sentences = [f"{name} has {x} {item}."]
    for _ in range(steps):
        ops = ["add", "sub", "mul", "div"]
        if x > 400:
            ops = ["sub", "div"]
        divisors = [k for k in (2, 3, 4, 5) if x % k == 0 and x // k >= 2]
        if not divisors:
            ops = [o for o in ops if o != "div"] or ["add"]
        if x < 4:
            ops = [o for o in ops if o != "sub"] or ["add"]
        op = rng.choice(ops)
        if op == "add":
            b = rng.randint(2, 40)
            sentences.append(rng.choice([f"{name} buys {b} more {item}.", f"{rng.choice(_FRIENDS).capitalize()} gives "
                                         f"{name} {b} {item}.", f"{name} finds {b} more {item}."]))
            x += b
        elif op == "sub":
            b = rng.randint(1, x - 1)
            sentences.append(rng.choice([f"{name} gives {b} {item} to {rng.choice(_FRIENDS)}.",
                                         f"{name} loses {b} {item}.", f"{name} sells {b} {item}."]))
            x -= b
        elif op == "mul":
            k = rng.choice([2, 3, 4, 5])
            word = {2: "doubles", 3: "triples"}.get(k)
            sentences.append(f"Then the number of {item} {name} has {word}." if word else
                             f"Then {name} ends up with {k} times as many {item} as before.")
            x *= k
        else:
            k = rng.choice(divisors)
            sentences.append(f"{name} splits the {item} equally into {k} bags and keeps only one bag.")
            x //= k
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(id=f"arith-{split}-{idx:05d}", question=" ".join(sentences), answer=str(x), source="arith",
                   difficulty=steps, meta={"steps": steps})


def load_arith(split: str, path=None, limit=None, seed=0, shuffle=False, skip_invalid=False, stats=None):
    """Generated problems; the same (split, seed) always gives the same problems."""
    if split not in ARITH_SIZES:
        raise DataError(f"arith has splits {list(ARITH_SIZES)}, not {split!r}")
    rng = random.Random(seed * 1_000_003 + _SPLIT_SALT[split])
    probs = [_arith_problem(rng, i, split) for i in range(ARITH_SIZES[split])]
    return _finish(probs, limit, seed, shuffle)


# --------------------------------------------------------------------------------------------
# file-backed datasets
# --------------------------------------------------------------------------------------------


def _resolve_file(path: str | os.PathLike, split: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / f"{split}.jsonl"
    if not p.exists():
        raise DataError(f"dataset file not found: {p}")
    return p


def _finish(probs: list[Problem], limit, seed, shuffle) -> list[Problem]:
    if shuffle:
        probs = probs[:]
        random.Random(seed).shuffle(probs)
    return probs[:limit] if limit else probs


def _rows(name: str, split: str, path, hub_id: str, hub_config: str | None, skip_invalid: bool, stats: dict):
    if path:
        f = _resolve_file(path, split)
        for i, row in enumerate(iter_jsonl(f, skip_invalid=skip_invalid, stats=stats), 1):
            yield f"{f}:{i}", row
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"{name}: no local path given and HF_HUB_OFFLINE=1; pass --data DIR or "
                        f"--set train_data.path=FILE")
    try:
        import datasets  # type: ignore
    except ImportError:
        raise DataError(f"{name}: no local path given; install the 'datasets' package to read {hub_id} "
                        "from the Hub, or give a local JSONL path") from None
    ds = datasets.load_dataset(hub_id, hub_config, split=split)
    for i, row in enumerate(ds, 1):
        yield f"{hub_id}:{split}:{i}", dict(row)


def _convert(rows, make, skip_invalid: bool, stats: dict) -> list[Problem]:
    out = []
    for where, row in rows:
        try:
            out.append(make(row, len(out)))
        except (KeyError, ValueError, TypeError) as e:
            if skip_invalid:
                stats["skipped"] = stats.get("skipped", 0) + 1
                continue
            raise DataError(f"{where}: invalid row ({type(e).__name__}: {e})") from None
    return out


BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data"
BUNDLED_SHA256 = {
    "gsm8k/train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}
"""sha256 of every data file shipped in the package (7,473 GSM8K train and 1,319 test problems)."""


def bundled_file(relpath: str) -> Path:
    """A data file shipped with the package, verified against its pinned sha256."""
    if relpath not in BUNDLED_SHA256:
        raise DataError(f"no bundled data file {relpath!r}; bundled: {', '.join(sorted(BUNDLED_SHA256))}")
    f = BUNDLED_DIR / relpath
    if not f.exists():
        raise DataError(f"bundled data file missing: {f} (a broken install; reinstall thinkpress)")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    if digest != BUNDLED_SHA256[relpath]:
        raise DataError(f"bundled data file {f} has sha256 {digest}, expected {BUNDLED_SHA256[relpath]}: "
                        "the file was changed or corrupted; reinstall thinkpress")
    return f


GSM8K_SPLITS = ("train", "validation", "test")
GSM8K_VALIDATION_SIZE = 500
_VALIDATION_SEED = 20251130  # fixed: the carve does not move with the run's seed


def carve_validation(n_rows: int, size: int = GSM8K_VALIDATION_SIZE) -> set[int]:
    """Row indices of the validation split carved from a train file of ``n_rows`` rows.

    A fixed seeded sample (independent of the run's ``seed``), so ``train`` and ``validation`` are
    disjoint in every run and hyperparameters can be tuned without touching ``test``.
    """
    return set(random.Random(_VALIDATION_SEED).sample(range(n_rows), min(size, n_rows // 5)))


def load_gsm8k(split: str, path=None, limit=None, seed=0, shuffle=False, skip_invalid=False, stats=None):
    """GSM8K from ``path``, else from the bundled copy (offline).

    Splits: ``test`` (1,319), ``validation`` (500 problems carved from the train file by
    :func:`carve_validation`) and ``train`` (the rest of the train file: 6,973 of 7,473). Problem ids keep
    the train file's row index (``gsm8k-train-00042``), so the two are disjoint by id.
    """
    stats = {} if stats is None else stats
    if split not in GSM8K_SPLITS:
        raise DataError(f"gsm8k has splits {list(GSM8K_SPLITS)}, not {split!r}")
    file_split = "test" if split == "test" else "train"
    if not path:
        path = bundled_file(f"gsm8k/{file_split}.jsonl")

    def make(row, i):
        return Problem(id=f"gsm8k-{file_split}-{i:05d}", question=row["question"],
                       answer=gsm8k_gold(row["answer"]), solution=row["answer"], source="gsm8k")

    probs = _convert(_rows("gsm8k", file_split, path, "openai/gsm8k", "main", skip_invalid, stats), make,
                     skip_invalid, stats)
    if file_split == "train":
        held = carve_validation(len(probs))
        probs = [p for i, p in enumerate(probs) if (i in held) == (split == "validation")]
    return _finish(probs, limit, seed, shuffle)


def load_math500(split: str, path=None, limit=None, seed=0, shuffle=False, skip_invalid=False, stats=None):
    stats = {} if stats is None else stats

    def make(row, i):
        level = row.get("level")
        return Problem(id=row.get("unique_id") or f"math500-{split}-{i:05d}", question=row["problem"],
                       answer=str(row["answer"]), solution=row.get("solution"), source="math500",
                       difficulty=int(level) if level is not None else None,
                       meta={"subject": row.get("subject")} if row.get("subject") else {})

    probs = _convert(_rows("math500", split, path, "HuggingFaceH4/MATH-500", None, skip_invalid, stats), make,
                     skip_invalid, stats)
    return _finish(probs, limit, seed, shuffle)


def load_jsonl(split: str, path=None, limit=None, seed=0, shuffle=False, skip_invalid=False, stats=None):
    """Generic JSONL: GSM8K-style (question + answer with ####) or MATH-style (problem + answer) rows."""
    if not path:
        raise DataError("dataset 'jsonl' needs a path (--data FILE_OR_DIR)")
    stats = {} if stats is None else stats
    f = _resolve_file(path, split)

    def make(row, i):
        q = row.get("question") or row.get("problem")
        if q is None:
            raise KeyError("question/problem")
        ans = row["answer"]
        if isinstance(ans, str) and "####" in ans:
            gold, sol = gsm8k_gold(ans), ans
        else:
            gold, sol = str(ans), row.get("solution")
        return Problem(id=str(row.get("id") or row.get("unique_id") or f"{f.stem}-{i:05d}"), question=q, answer=gold,
                       solution=sol, source=f.parent.name or "jsonl")

    rows = ((f"{f}:{i}", r) for i, r in enumerate(iter_jsonl(f, skip_invalid=skip_invalid, stats=stats), 1))
    return _finish(_convert(rows, make, skip_invalid, stats), limit, seed, shuffle)


BUILTIN_DATASETS = {"arith": load_arith, "gsm8k": load_gsm8k, "math500": load_math500, "jsonl": load_jsonl}
