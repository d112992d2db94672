"""Data preparation: text files -> deduplicated, shuffled, tokenized ``train.bin``/``val.bin`` + ``meta.json``.

A prepared directory holds two raw token arrays (read them with ``open_split``), ``meta.json`` (written
last, so its presence marks a complete directory) and, for BPE, ``tokenizer.json``. Every document is
followed by one end-of-text token. The whole corpus is held in memory while it is prepared.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from fastcore.files import write_atomic, write_text_atomic
from fastcore.train.progress import Progress

FORMAT = 1
EOT_TEXT = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte values + end-of-text
MAX_BPE_VOCAB = 1 << 24  # the trainer's memory grows with it: 2**31 aborts the process
# Suffixes read when a directory is given; a file named explicitly (or matched by a glob) is always read.
TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".jsonl", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu",
    ".js", ".ts", ".html", ".css", ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".csv",
})
STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
PROGRESS_BYTES = 8 << 20
MIN_VAL_TOKENS = 129  # the tiny preset's block size + 1: fewer cannot be evaluated


class DataError(ValueError):
    """A problem with the user's data or arguments; the message names the path or argument."""


# ---------------------------------------------------------------------------------------------- inputs

def _under(directory: Path) -> list[Path]:
    # Hidden directories (.git, .venv) hold tooling, not corpus.
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs`` (files, directories, glob patterns), in input order, each listed once."""
    if not inputs:
        raise DataError("inputs: no input files, directories or glob patterns given")
    files: dict[Path, None] = {}
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.exists():
            matches = [path]
        else:
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(str(spec)), recursive=True))]
            if not matches:
                raise DataError(f"input {str(spec)!r}: no such file or directory, and no file matches it as a glob")
        found = []
        for match in matches:
            found += _under(match) if match.is_dir() else [match] if match.is_file() else []
        if not found:
            raise DataError(f"input {str(spec)!r}: no text files found (directories are searched for "
                            f"{', '.join(sorted(TEXT_SUFFIXES))})")
        files.update((f.resolve(), None) for f in found)
    return list(files)


def _texts(path: Path, raw: bytes, counts: dict):
    """The documents in one file, as text: each ``text`` field of a .jsonl file, otherwise the whole file.
    Invalid UTF-8 becomes U+FFFD, and each file that had any is counted."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        counts["invalid_utf8_files"] += 1
    if path.suffix.lower() != ".jsonl":
        yield text
        return
    # JSON Lines ends records at "\n" only: U+2028 and friends are text inside a record, not line breaks.
    for lineno, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line") from None
        value = record.get("text") if isinstance(record, dict) else None
        if isinstance(value, str):
            yield value
        else:
            counts["skipped_jsonl_lines"] += 1


def _read_documents(files: list[Path], progress: bool) -> tuple[list[bytes], dict]:
    """Unique, non-blank documents as UTF-8 bytes, in file order, and what was dropped."""
    counts = {"duplicates_dropped": 0, "empty_dropped": 0, "skipped_jsonl_lines": 0, "invalid_utf8_files": 0}
    seen, docs = set(), []
    total = sum(f.stat().st_size for f in files)
    with Progress(total, "reading", unit="B", enabled=progress and total > PROGRESS_BYTES) as bar:
        for path in files:
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise DataError(f"input {path}: cannot read it ({exc.strerror})") from None
            for text in _texts(path, raw, counts):
                if not text.strip():
                    counts["empty_dropped"] += 1
                    continue
                doc = text.encode("utf-8", "replace")  # "replace": JSON may hold lone surrogates
                key = hashlib.blake2b(doc, digest_size=16).digest()
                if key in seen:
                    counts["duplicates_dropped"] += 1
                    continue
                seen.add(key)
                docs.append(doc)
            bar.update(len(raw))
    return docs, counts


# ------------------------------------------------------------------------------------------ tokenizers

def _byte_tokens(docs: list[bytes]) -> np.ndarray:
    """Each document's bytes then the end-of-text token 256, as one uint16 array, without a Python loop per byte."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    eot_at = np.cumsum(lengths + 1) - 1
    tokens = np.empty(int(eot_at[-1]) + 1, dtype=np.uint16)
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[eot_at] = False
    tokens[is_text] = np.frombuffer(b"".join(docs), dtype=np.uint8)
    tokens[eot_at] = BYTE_VOCAB - 1
    return tokens


def _hf():
    try:
        import tokenizers
    except ImportError:
        raise DataError("tokenizer 'bpe' needs the HuggingFace tokenizers library: pip install tokenizers") from None
    return tokenizers


def _train_bpe(texts: list[str], vocab: int, progress: bool):
    hf = _hf()
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT_TEXT], show_progress=progress,
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def _bpe_tokens(tok, texts: list[str], eot: int) -> np.ndarray:
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    pieces = []
    for encoding in tok.encode_batch(texts, add_special_tokens=False):
        pieces += [np.asarray(encoding.ids, dtype=dtype), np.array([eot], dtype=dtype)]
    return np.concatenate(pieces)


class Tokenizer:
    """``encode(text) -> ids`` never emits end-of-text, even for the literal text ``<|endoftext|>``;
    ``decode(ids) -> text`` renders end-of-text as ``<|endoftext|>`` and invalid UTF-8 as U+FFFD."""

    def __init__(self, kind: str, vocab_size: int, eot: int, hf_tokenizer=None):
        self.kind, self.vocab_size, self.eot = kind, vocab_size, eot
        self._hf = hf_tokenizer
        if hf_tokenizer is not None:
            hf_tokenizer.encode_special_tokens = True  # document text is never a control token

    def encode(self, text: str) -> list[int]:
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. a command-line byte that was not UTF-8
            raise ValueError(f"text is not valid Unicode ({exc.reason} at character {exc.start})") from None
        return list(raw) if self._hf is None else self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        bad = [i for i in ids if not 0 <= i <= self.eot]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the byte vocabulary 0..{self.eot}")
        pieces, start = [], 0
        for at in [i for i, t in enumerate(ids) if t == self.eot] + [len(ids)]:
            pieces.append(bytes(ids[start:at]).decode("utf-8", "replace"))
            start = at + 1
        return EOT_TEXT.join(pieces)

    def __repr__(self):
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot={self.eot})"


# ----------------------------------------------------------------------------------------------- prepare

def _check_args(tokenizer: str, vocab: int | None, val_fraction: float, seed: int):
    if tokenizer == "byte":
        if vocab not in (None, BYTE_VOCAB):
            raise DataError(f"vocab={vocab}: the byte tokenizer has a fixed vocabulary of {BYTE_VOCAB} "
                            f"(256 bytes + end-of-text); a vocabulary size is for tokenizer 'bpe'")
    elif tokenizer == "bpe":
        whole = isinstance(vocab, int) and not isinstance(vocab, bool)
        if not (whole and BYTE_VOCAB < vocab <= MAX_BPE_VOCAB):
            raise DataError(f"vocab={vocab}: tokenizer 'bpe' needs a vocabulary size above {BYTE_VOCAB} "
                            f"(256 bytes + end-of-text + merges), at most 2**24")
        _hf()
    else:
        raise DataError(f"tokenizer={tokenizer!r}: expected 'byte' or 'bpe'")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    if not valid_seed(seed):
        raise DataError(f"seed={seed}: expected a whole number, 0 <= seed < 2**64")


def valid_seed(seed) -> bool:
    """Seeds are torch's non-negative range; numpy takes them too."""
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 1 << 64


def make_dir(path: Path, name: str, error: type[Exception]) -> None:
    """``mkdir -p path``, with ``error`` naming the argument where it cannot be a directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"{name}: {path} exists and is not a directory") from None
    except OSError as exc:  # a file on the way, permissions, read-only file system
        raise error(f"{name}: cannot create the directory {path} ({exc.strerror})") from None


def prepare(inputs: list[str], out: str | os.PathLike, *, tokenizer: str = "byte", vocab: int | None = None,
            val_fraction: float = 0.05, seed: int = 0, progress: bool = True,
            files: list[Path] | None = None) -> dict:
    """Tokenize ``inputs`` (files, directories, glob patterns) into ``out``; return its meta.json as a dict.
    ``files``: ``resolve_inputs(inputs)`` when the caller has it already."""
    _check_args(tokenizer, vocab, val_fraction, seed)
    sources = [str(s) for s in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    files = resolve_inputs(sources) if files is None else files
    return _prepare_files(files, Path(out), tokenizer=tokenizer, vocab=vocab,
                          val_fraction=val_fraction, seed=seed, progress=progress, sources=sources)


def _prepare_files(files: list[Path], out: Path, *, tokenizer: str, vocab: int | None, val_fraction: float,
                   seed: int, progress: bool, sources: list[str], shown_as: Path | None = None) -> dict:
    docs, counts = _read_documents(files, progress)
    if not docs:
        raise DataError(f"inputs {', '.join(sources)}: no text left after dropping {_dropped(counts)}")
    # Shuffled by document, so the validation tail is not simply the last directory read.
    docs = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]
    make_dir(out, "out", DataError)
    (out / "meta.json").unlink(missing_ok=True)  # the directory is incomplete until meta.json is rewritten

    info = {"kind": tokenizer}
    if tokenizer == "byte":
        tokens = _byte_tokens(docs)
        info.update(vocab_size=BYTE_VOCAB, eot=BYTE_VOCAB - 1)
    else:
        texts = [d.decode("utf-8") for d in docs]
        tok = _train_bpe(texts, vocab, progress)
        tok.encode_special_tokens = True  # a document quoting "<|endoftext|>" must not split itself
        info.update(vocab_size=tok.get_vocab_size(), eot=tok.token_to_id(EOT_TEXT), file="tokenizer.json")
        tokens = _bpe_tokens(tok, texts, info["eot"])
        write_atomic(out / "tokenizer.json", lambda p: tok.save(str(p)))

    dtype = np.uint16 if info["vocab_size"] <= 1 << 16 else np.uint32
    tokens = tokens.astype(dtype, copy=False)
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    write_atomic(out / "train.bin", train.tofile)
    write_atomic(out / "val.bin", val.tofile)
    meta = {"format": FORMAT, "tokenizer": info, "dtype": np.dtype(dtype).name,
            "train_tokens": len(train), "val_tokens": len(val), "documents": len(docs), **counts,
            "bytes": sum(len(d) for d in docs), "sources": sources, "seed": seed, "val_fraction": val_fraction}
    write_text_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    invalid = counts["invalid_utf8_files"]
    print(f"prepared {len(docs)} documents ({_dropped(counts)} dropped"
          + (f"; invalid UTF-8 in {invalid} file{'s' * (invalid != 1)} replaced by U+FFFD" if invalid else "")
          + f") -> {len(train)} train / {len(val)} val tokens in {shown_as or out}", file=sys.stderr)
    if len(val) < MIN_VAL_TOKENS:
        print(f"note: the val split holds {len(val)} tokens, too few to evaluate even the tiny preset "
              f"(block size + 1 = {MIN_VAL_TOKENS}); `fastcore train` needs more: raise --val-fraction or add data",
              file=sys.stderr)
    return meta


def _dropped(counts: dict) -> str:
    parts = [f"{counts['empty_dropped']} empty", f"{counts['duplicates_dropped']} duplicate documents"]
    if counts["skipped_jsonl_lines"]:
        parts.append(f"{counts['skipped_jsonl_lines']} .jsonl records without a string 'text' field")
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ------------------------------------------------------------------------------------------------ reading

def load_meta(data_dir) -> dict:
    """The validated meta.json of a prepared directory."""
    path = Path(data_dir) / "meta.json"
    hint = f"{data_dir} is not a prepared data directory; run `fastcore data prepare`"
    try:
        meta = json.loads(path.read_text())
        tok = meta["tokenizer"]
        ok = (meta["format"] == FORMAT and tok["kind"] in ("byte", "bpe") and meta["dtype"] in ("uint16", "uint32")
              and all(isinstance(meta[k], int) for k in ("train_tokens", "val_tokens"))
              and all(isinstance(tok[k], int) for k in ("vocab_size", "eot")))
    except FileNotFoundError:
        raise DataError(f"{path} not found: {hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is unreadable ({type(exc).__name__}: {exc}): {hint}") from None
    if not ok:
        raise DataError(f"{path} has unexpected contents (format {meta.get('format')!r}, expected {FORMAT}): {hint}")
    return meta


def load_tokenizer(data_dir) -> Tokenizer:
    """The tokenizer a prepared directory was encoded with."""
    info = load_meta(data_dir)["tokenizer"]
    if info["kind"] == "byte":
        return Tokenizer("byte", info["vocab_size"], info["eot"])
    path = Path(data_dir) / info.get("file", "tokenizer.json")
    if not path.is_file():
        raise DataError(f"{path} not found: the BPE tokenizer of {data_dir} is missing; prepare it again")
    return Tokenizer("bpe", info["vocab_size"], info["eot"], _hf().Tokenizer.from_file(str(path)))


def identity(data_dir) -> dict:
    """Digests of a prepared directory's meta.json and tokenizer: a checkpoint records them, so that
    ``--resume`` can tell other data, and a tokenizer whose ids mean other text, from the run's own."""
    info = load_meta(data_dir)["tokenizer"]
    digest = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()  # noqa: E731
    tokenizer = "byte" if info["kind"] == "byte" else digest(Path(data_dir) / info.get("file", "tokenizer.json"))
    return {"meta": digest(Path(data_dir) / "meta.json"), "tokenizer": tokenizer}


def open_split(data_dir, split: str) -> np.memmap:
    """The tokens of ``split`` ('train' or 'val') as a read-only array, without reading them into memory."""
    if split not in ("train", "val"):
        raise DataError(f"split={split!r}: expected 'train' or 'val'")
    meta = load_meta(data_dir)
    path, dtype = Path(data_dir) / f"{split}.bin", np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"]
    if not path.is_file():
        raise DataError(f"{path} not found: {data_dir} is incomplete; run `fastcore data prepare` again")
    if path.stat().st_size != expected * dtype.itemsize:
        raise DataError(f"{path}: {path.stat().st_size} bytes, expected {expected} {dtype.name} tokens; prepare again")
    if expected == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ------------------------------------------------------------------------------------------- default data

def default_corpus() -> list[Path]:
    """The ``.py`` sources of this Python's standard library, without its tests and bundled packages."""
    files = []
    for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED]  # pruned, not filtered: site-packages is large
        files += [Path(root, n) for n in names if n.endswith(".py") and os.path.isfile(os.path.join(root, n))]
    return sorted(files)


def default_data_dir() -> Path:
    """The default corpus, byte-tokenized once into the cache and reused afterwards."""
    from fastcore.extension import cache_dir  # one cache root for the extension and the data

    final = cache_dir() / "data" / f"stdlib-{sys.version_info.major}.{sys.version_info.minor}-byte"
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"fastcore: preparing the default training data (Python standard library sources) in {final}, once",
          file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would carry over to the shared cache directory
    try:
        stdlib = sysconfig.get_paths()["stdlib"]
        _prepare_files(default_corpus(), tmp, tokenizer="byte", vocab=None, val_fraction=0.05, seed=0,
                       progress=True, sources=[f"{stdlib}/**/*.py (tests and bundled packages excluded)"],
                       shown_as=final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first: use its directory. Anything else there is not ours to delete.
            if not (final / "meta.json").is_file():
                raise DataError(f"{final} exists but is not a prepared data directory; remove it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
