"""Run store: the run directory, the content-keyed stage cache and resumable journals.

Layout of a run directory ``runs/<name>/``::

    config.yaml        resolved config (written first; a different config is never silently reused)
    manifest.json      versions, seed, git state, hardware, timings
    run.log            log of the run
    stages/<i>-<stage>-<component>/   copy of each stage output (JSONL + meta.json)
    eval/<variant>/predictions.jsonl, metrics.json
    report.json, report.md, plot.png

Stage outputs live in the stage cache (``<cache_dir>/<key>/``), where ``key`` hashes the stage, the
component and its config, the keys of its inputs and the model identity. An ablation grid whose
runs share upstream stages computes them once; a killed run finds its finished stages there.
Long stages (sampling, evaluation) append finished chunks of problems to ``journal.jsonl`` in the
stage's cache directory: one JSON line per chunk, flushed and fsync'd, so a rerun resumes after the
last completed chunk without duplicating or losing samples (a torn last line is ignored).
All other writes are atomic (temp file + rename). Samplers also keep each problem's completions in
``<cache_dir>/samples/`` (:class:`SampleCache`), so a run over more problems decodes only the new ones.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from thinkpress.core.errors import RunStoreError
from thinkpress.core.files import atomic_dir, atomic_file, atomic_write_json, atomic_write_text


def stable_hash(*parts: Any) -> str:
    """24 hex digits of the sha256 of ``parts`` as canonical JSON (the same on every machine and run)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def derive_seed(*parts: Any) -> int:
    """A 60-bit seed from ``parts`` (e.g. the run seed and a problem id): independent of batching and resume."""
    return int(stable_hash(*parts)[:15], 16)


class Journal:
    """Append-only record of finished chunks of a long stage (for resume)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, list[dict]]:
        """Finished chunks: chunk id -> records. A torn (partial) last line is dropped."""
        done: dict[str, list[dict]] = {}
        if not self.path.exists():
            return done
        good_bytes = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    entry = json.loads(raw)
                except ValueError:
                    break
                done[entry["chunk"]] = entry["records"]
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:  # drop a torn tail so later appends stay parseable
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return done

    def append(self, chunk_id: str, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"chunk": chunk_id, "records": records}, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def chunked(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def resumable_map(
    journal: Journal,
    items: list,
    fn: Callable[[list], list[BaseModel | dict]],
    *,
    chunk_size: int,
    item_id: Callable[[Any], str],
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[list[dict], int]:
    """Apply ``fn`` to fixed chunks of ``items``, journaling each finished chunk.

    Chunks are fixed by position and content (the ids of their items), so a resumed run processes
    exactly the chunks an uninterrupted run would, with the same batch composition (and so the same
    numbers). Returns all records in item order and the number of chunks reused from the journal.
    """
    done = journal.load()
    out: list[dict] = []
    reused = 0
    for chunk in chunked(items, max(1, chunk_size)):
        cid = stable_hash([item_id(x) for x in chunk])
        if cid in done:
            out.extend(done[cid])
            reused += 1
        else:
            records = [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in fn(chunk)]
            journal.append(cid, records)
            out.extend(records)
        if on_chunk:
            on_chunk(len(chunk))
    return out, reused


class SampleCache:
    """Completions of earlier sampling requests, one file per problem request, shared by runs and methods.

    The stage cache keys a whole stage: a sampler stage over 320 problems shares nothing with one over
    the first 160 of them. This cache keys one problem's request: the model, the adapter, the engine,
    the dtype, the exact prompt, the generation settings, the number of samples and the problem's
    seed (left out for greedy requests, which do not use it). A later run that asks for the same
    completions (a larger training set, another method's sampler with the same settings, another
    seed of a greedy sampler) reads them instead of decoding again. Files live in
    ``<cache_dir>/samples/<key[:2]>/<key>.json`` and are written atomically; readers ignore a file
    that does not parse. Completions are stored ungraded: grading runs on every read.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return stable_hash("sample-cache-v1", request)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[dict] | None:
        """The stored completions for ``key`` (dicts: text, n_tokens, finish_reason, logprob), or None."""
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        comps = entry.get("completions") if isinstance(entry, dict) else None
        return comps if isinstance(comps, list) else None

    def put(self, key: str, request: dict[str, Any], completions: list[dict]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"request": request, "completions": completions})

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every valid entry (``{"key", "request", "completions"}``), in key order; unreadable files are skipped."""
        for path in sorted(self.root.glob("*/*.json")):
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            entry = {"key": path.stem, **entry} if isinstance(entry, dict) else None
            if entry is not None and _entry_problem(entry) is None:
                yield entry

    def export(self, dest: Path, model: str | None = None) -> int:
        """Write the entries to ``dest`` as JSON lines (gzip when it ends in ``.gz``): a file that carries sampled
        completions to another machine or into the repository. ``model``: only requests whose model identity
        contains this string (e.g. ``qwen2.5-coder-0.5b``). Returns the number of entries written."""
        rows = [e for e in self.entries() if model is None or model in str(e["request"].get("model"))]
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in rows)
        data = text.encode("utf-8")
        if str(dest).endswith(".gz"):
            data = gzip.compress(data, mtime=0)  # no timestamp: the same entries give the same bytes
        with atomic_file(dest, "wb") as f:
            f.write(data)
        return len(rows)

    def import_file(self, src: Path) -> tuple[int, int]:
        """Add the entries of a file written by :meth:`export`; returns (added, already present).

        Every line is checked before anything is written (:meth:`read_export`), so a damaged or edited
        file adds nothing and the error names its line.
        """
        return self.add(self.read_export(src))

    def add(self, entries: list[dict[str, Any]]) -> tuple[int, int]:
        """Store checked entries (from :meth:`read_export`) not already present; returns (added, already present)."""
        added = 0
        for e in entries:
            if self.get(e["key"]) is None:
                self.put(e["key"], e["request"], e["completions"])
                added += 1
        return added, len(entries) - added

    @staticmethod
    def read_export(src: Path) -> list[dict[str, Any]]:
        """The entries of a file written by :meth:`export`, each checked: its key must be the hash of its
        request, and it must carry ``request["n"]`` completions with text, n_tokens and finish_reason."""
        try:
            raw = src.read_bytes()
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise RunStoreError(f"{src}: not a sample export ({type(e).__name__}: {e})") from None
        entries = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise RunStoreError(f"{src}, line {i}: not JSON ({e})") from None
            problem = _entry_problem(entry) if isinstance(entry, dict) else "not an object"
            if problem:
                raise RunStoreError(f"{src}, line {i}: {problem}; nothing was imported")
            entries.append(entry)
        return entries


def _entry_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with a sample-cache entry, or None when it is sound."""
    req, comps = entry.get("request"), entry.get("completions")
    if not isinstance(req, dict) or not isinstance(comps, list):
        return "needs a 'request' object and a 'completions' list"
    if entry.get("key") != SampleCache.key(req):
        return "its key is not the hash of its request (edited or from another format version)"
    if req.get("n") != len(comps):
        return f"the request asks for {req.get('n')} completions and it has {len(comps)}"
    for c in comps:
        if not (isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("n_tokens"), int)
                and isinstance(c.get("finish_reason"), str)):
            return "a completion lacks text, n_tokens or finish_reason"
    return None


class RunStore:
    """The run directory of one run plus the shared stage cache."""

    def __init__(self, run_dir: Path, cache_dir: Path):
        self.dir = Path(run_dir)
        # Absolute, so that paths components return (adapters) do not depend on the working directory.
        self.cache_dir = Path(cache_dir).resolve()

    def claim(self, config_yaml: str, config_hash: str, overwrite: bool = False) -> bool:
        """Create or reuse the run directory. Returns True when resuming an existing run.

        A directory holding a different config is refused unless ``overwrite`` (then it is cleared).
        """
        cfg_path = self.dir / "config.yaml"
        hash_path = self.dir / "config.hash"
        if self.dir.exists() and any(self.dir.iterdir()):
            old = hash_path.read_text().strip() if hash_path.exists() else None
            if old == config_hash:
                return True
            if not overwrite:
                why = "a different config" if old else "files that are not a thinkpress run"
                raise RunStoreError(
                    f"run directory {self.dir} holds {why} (hash {old} != {config_hash}); "
                    "choose another --out or pass --overwrite to replace it"
                )
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_path, config_yaml)
        atomic_write_text(hash_path, config_hash + "\n")
        return False

    def stage_cache(self, key: str) -> Path:
        return self.cache_dir / key

    def sample_cache(self) -> SampleCache:
        """Per-problem sampling requests, next to the stage cache (see :class:`SampleCache`)."""
        return SampleCache(self.cache_dir / "samples")

    @contextlib.contextmanager
    def lock(self, key: str):
        """Hold the cache key ``key`` exclusively (an OS file lock, released when the process dies).

        Workers that share the stage cache (``core ablate --workers N``, Ray tasks on shared storage)
        take it around computing a stage or an evaluation: the first computes and publishes, the
        others block here and then find the finished output.
        """
        import fcntl

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f"{key}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def is_complete(path: Path) -> bool:
        return (path / "meta.json").exists()

    def publish_stage(self, cache_path: Path, label: str) -> Path:
        """Copy a finished stage output from the cache into the run directory."""
        dest = self.dir / "stages" / label
        with atomic_dir(dest) as tmp:
            shutil.copytree(cache_path, tmp, ignore=shutil.ignore_patterns("journal.jsonl", "*.tmp"),
                            dirs_exist_ok=True)
        return dest

