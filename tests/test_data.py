"""Data preparation: exact token streams, dedupe and skip counts, splits, BPE, the default corpus, bad input."""
import io
import json
import shutil

import numpy as np
import pytest

from fastcore.train import data
from fastcore.train.data import DataError
from fastcore.train.progress import Progress


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tokens(out, split="train"):
    return np.asarray(data.open_split(out, split)).tolist()


def documents(stream, eot):
    """The token stream cut at each end-of-text, which must close it."""
    assert stream[-1] == eot
    docs, start = [], 0
    for i, t in enumerate(stream):
        if t == eot:
            docs.append(stream[start:i])
            start = i + 1
    return docs


def test_byte_single_document_exact_tokens(tmp_path):
    write(tmp_path / "a.txt", "hello")
    meta = data.prepare([str(tmp_path / "a.txt")], tmp_path / "out", val_fraction=0, progress=False)
    assert tokens(tmp_path / "out") == [104, 101, 108, 108, 111, 256]
    assert tokens(tmp_path / "out", "val") == []
    assert meta["tokenizer"] == {"kind": "byte", "vocab_size": 257, "eot": 256}
    assert (meta["train_tokens"], meta["val_tokens"], meta["documents"], meta["bytes"]) == (6, 0, 1, 5)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta


def test_byte_round_trip_utf8_and_eot_placement(tmp_path):
    texts = ["héllo wörld\n", "日本語 text", "plain ascii"]
    for i, text in enumerate(texts):
        write(tmp_path / "in" / f"{i}.txt", text)
    meta = data.prepare([str(tmp_path / "in")], tmp_path / "out", val_fraction=0, progress=False)
    stream = tokens(tmp_path / "out")
    assert stream.count(256) == 3
    assert sorted(bytes(d).decode() for d in documents(stream, 256)) == sorted(texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert (meta["bytes"], meta["train_tokens"], meta["documents"]) == (n_bytes, n_bytes + 3, 3)
    tok = data.load_tokenizer(tmp_path / "out")
    assert (tok.kind, tok.vocab_size, tok.eot) == ("byte", 257, 256)
    assert tok.encode("héllo") == list("héllo".encode())
    assert tok.decode(stream) == "".join(bytes(d).decode() + "<|endoftext|>" for d in documents(stream, 256))
    assert tok.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence is replaced, not an error


def test_same_seed_same_files_other_seed_other_order(tmp_path):
    for i in range(30):
        write(tmp_path / "in" / f"{i:02d}.txt", f"document number {i}")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        data.prepare([str(tmp_path / "in")], tmp_path / name, seed=seed, val_fraction=0, progress=False)
    read = {name: (tmp_path / name / "train.bin").read_bytes() for name in "abc"}
    assert read["a"] == read["b"]
    assert read["a"] != read["c"]
    in_file_order = b"".join(f"document number {i:d}".encode() for i in sorted(range(30), key=lambda i: f"{i:02d}"))
    shuffled = bytes(t for t in tokens(tmp_path / "a") if t != 256)
    assert len(shuffled) == len(in_file_order) and shuffled != in_file_order


def test_duplicates_and_blank_documents_are_dropped_and_counted(tmp_path):
    write(tmp_path / "in" / "a.txt", "same text")
    write(tmp_path / "in" / "b.txt", "same text")
    write(tmp_path / "in" / "c.txt", "other")
    write(tmp_path / "in" / "d.txt", " \n\t \u3000")
    meta = data.prepare([str(tmp_path / "in")], tmp_path / "out", val_fraction=0.25, progress=False)
    assert (meta["documents"], meta["duplicates_dropped"], meta["empty_dropped"]) == (2, 1, 1)
    assert meta["train_tokens"] + meta["val_tokens"] == len("same text") + len("other") + 2 == 16
    assert meta["val_tokens"] == 4


def test_jsonl_text_fields_skipped_lines_and_duplicates(tmp_path):
    lines = ['{"text": "first"}', '{"meta": 1}', "", "[1, 2]", '{"text": 7}', '{"text": "first"}',
             '{"text": "sec\\u00f6nd"}']
    write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    meta = data.prepare([str(tmp_path / "d.jsonl")], tmp_path / "out", val_fraction=0, progress=False)
    assert (meta["documents"], meta["skipped_jsonl_lines"], meta["duplicates_dropped"]) == (2, 3, 1)
    assert sorted(bytes(d).decode() for d in documents(tokens(tmp_path / "out"), 256)) == ["first", "secönd"]


def test_jsonl_records_end_at_newline_only_with_a_bom_and_crlf(tmp_path, capsys):
    # U+2028, U+2029 and U+0085 are line breaks to str.splitlines but text to JSON Lines.
    texts = ["para\u2028graph", "next\u2029one", "nel\u0085here", "plain"]
    body = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n"
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    meta = data.prepare([str(tmp_path / "d.jsonl")], tmp_path / "out", val_fraction=0, progress=False)
    assert sorted(bytes(d).decode() for d in documents(tokens(tmp_path / "out"), 256)) == sorted(texts)
    assert (meta["documents"], meta["skipped_jsonl_lines"]) == (4, 0)


def test_skipped_jsonl_records_are_reported(tmp_path, capsys):
    write(tmp_path / "d.jsonl", '{"text": "kept"}\n{"body": "x"}\n[1]\n{"text": null}\n')
    data.prepare([str(tmp_path / "d.jsonl")], tmp_path / "out", val_fraction=0, progress=False)
    assert "3 .jsonl records without a string 'text' field" in capsys.readouterr().err
    write(tmp_path / "none.jsonl", '{"body": "x"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"no text left after dropping 0 empty, 0 duplicate documents and "
                                        r"2 \.jsonl records without a string 'text' field"):
        data.prepare([str(tmp_path / "none.jsonl")], tmp_path / "out2", progress=False)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "in" / "bad.jsonl").write_bytes(b'{"text": "ok \xff"}\n')
    write(tmp_path / "in" / "good.txt", "fine \ufffd already")  # a real U+FFFD is not an invalid byte
    meta = data.prepare([str(tmp_path / "in")], tmp_path / "out", val_fraction=0, progress=False)
    assert meta["invalid_utf8_files"] == 2
    assert "invalid UTF-8 in 2 files replaced by U+FFFD" in capsys.readouterr().err
    docs = sorted(bytes(d).decode() for d in documents(tokens(tmp_path / "out"), 256))
    assert docs == ["caf\ufffd", "fine \ufffd already", "ok \ufffd"]


def test_a_val_split_too_small_to_train_on_is_noted(tmp_path, capsys):
    write(tmp_path / "a.txt", "x" * 1000)
    data.prepare([str(tmp_path / "a.txt")], tmp_path / "out", val_fraction=0.05, progress=False)
    err = capsys.readouterr().err
    assert "the val split holds 50 tokens, too few" in err and "--val-fraction" in err
    data.prepare([str(tmp_path / "a.txt")], tmp_path / "out", val_fraction=0.2, progress=False)
    assert "val split holds" not in capsys.readouterr().err


def test_encode_refuses_text_that_is_not_unicode(tmp_path):
    tok = data.Tokenizer("byte", 257, 256)
    with pytest.raises(ValueError, match=r"text is not valid Unicode \(surrogates not allowed at character 2\)"):
        tok.encode("ab\udcff")  # how Python hands over a command-line byte that is not UTF-8


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        data.prepare([str(tmp_path / "bad.jsonl")], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_directory_skips_other_suffixes_and_hidden_dirs_glob_picks_matches(tmp_path):
    src = tmp_path / "src"
    write(src / "a.txt", "aaaa")
    write(src / "sub" / "b.md", "bb")
    write(src / "sub" / "c.rst", "c")
    write(src / "image.bin", "not text")
    write(src / ".venv" / "lib.py", "hidden")
    meta = data.prepare([str(src)], tmp_path / "dir", val_fraction=0, progress=False)
    assert (meta["documents"], meta["bytes"]) == (3, 7)

    meta = data.prepare([str(src / "**" / "*.md"), str(src / "image.bin")], tmp_path / "glob", val_fraction=0,
                        progress=False)
    assert (meta["documents"], meta["bytes"]) == (2, 10)
    assert meta["sources"] == [str(src / "**" / "*.md"), str(src / "image.bin")]

    # The same file reached twice is read once, so it is not counted as a duplicate document.
    meta = data.prepare([str(src), str(src / "a.txt")], tmp_path / "twice", val_fraction=0, progress=False)
    assert (meta["documents"], meta["duplicates_dropped"]) == (3, 0)


@pytest.mark.parametrize("val_fraction", [0.0, 0.1, 0.5, 0.999])
def test_val_fraction_split_sizes_dtype_and_file_sizes(tmp_path, val_fraction):
    for i in range(7):
        write(tmp_path / "in" / f"{i}.txt", "x" * (100 + 13 * i) + str(i))
    meta = data.prepare([str(tmp_path / "in")], tmp_path / "out", val_fraction=val_fraction, progress=False)
    total = sum(101 + 13 * i for i in range(7)) + 7
    assert meta["train_tokens"] + meta["val_tokens"] == total == 987
    assert meta["val_tokens"] == int(total * val_fraction)
    assert meta["dtype"] == "uint16"
    for split in ("train", "val"):
        assert (tmp_path / "out" / f"{split}.bin").stat().st_size == 2 * meta[f"{split}_tokens"]
        assert data.open_split(tmp_path / "out", split).dtype == np.uint16
    stream = tokens(tmp_path / "out") + tokens(tmp_path / "out", "val")
    assert stream.count(256) == 7 and stream[-1] == 256


def test_prepare_again_replaces_the_directory_contents(tmp_path):
    write(tmp_path / "a.txt", "one")
    write(tmp_path / "b.txt", "second one")
    data.prepare([str(tmp_path / "a.txt")], tmp_path / "out", val_fraction=0, progress=False)
    meta = data.prepare([str(tmp_path / "b.txt")], tmp_path / "out", val_fraction=0, progress=False)
    assert data.load_meta(tmp_path / "out") == meta
    assert tokens(tmp_path / "out") == list(b"second one") + [256]
    assert [p.name for p in (tmp_path / "out").iterdir() if ".tmp" in p.name] == []


def test_bpe_trains_compresses_and_round_trips(tmp_path):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "déjà", "vu"]
    rng = np.random.default_rng(0)
    for i in range(40):
        write(tmp_path / "in" / f"{i}.txt", " ".join(rng.choice(words, size=60)))
    write(tmp_path / "in" / "quote.txt", "a document quoting <|endoftext|> in its text")
    meta = data.prepare([str(tmp_path / "in")], tmp_path / "out", tokenizer="bpe", vocab=300, progress=False)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    info = meta["tokenizer"]
    assert info["kind"] == "bpe" and info["file"] == "tokenizer.json" and 257 < info["vocab_size"] <= 300
    assert meta["dtype"] == "uint16" and meta["documents"] == 41
    assert meta["train_tokens"] + meta["val_tokens"] < meta["bytes"]

    tok = data.load_tokenizer(tmp_path / "out")
    assert tok.eot == info["eot"] and tok.vocab_size == info["vocab_size"]
    text = "the lazy dog jumps, déjà vu! 日本 <|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot not in ids and max(ids) < tok.vocab_size
    stream = tokens(tmp_path / "out") + tokens(tmp_path / "out", "val")
    assert stream.count(tok.eot) == 41 and stream[-1] == tok.eot  # the quoted text did not split its document
    assert tok.decode(ids + [tok.eot]) == text + "<|endoftext|>"


def test_default_corpus_is_stdlib_without_tests():
    files = data.default_corpus()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any(data.STDLIB_EXCLUDED.intersection(f.parts) for f in files)
    assert any(f.name == "argparse.py" for f in files)
    assert files == sorted(files)


def test_default_data_dir_prepares_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path / "cache"))
    first = data.default_data_dir()
    assert first.parent == tmp_path / "cache" / "data" and first.name.startswith("stdlib-")
    meta = data.load_meta(first)
    assert meta["tokenizer"]["kind"] == "byte" and meta["documents"] > 100
    assert meta["train_tokens"] + meta["val_tokens"] == meta["bytes"] + meta["documents"]
    assert len(data.open_split(first, "train")) == meta["train_tokens"]
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert data.default_data_dir() == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary directory left


def test_default_data_dir_losing_the_race_uses_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "default_corpus", lambda: [write(tmp_path / "a.py", "x = 1\n")])
    prepare_files = data._prepare_files

    def prepare_then_lose(files, out, **kw):
        meta = prepare_files(files, out, **kw)
        shutil.copytree(out, out.parent / out.name.split(".tmp-")[0].lstrip("."))  # the other process wins
        return meta

    monkeypatch.setattr(data, "_prepare_files", prepare_then_lose)
    final = data.default_data_dir()
    assert data.load_meta(final)["documents"] == 1
    assert [p.name for p in final.parent.iterdir()] == [final.name]


@pytest.mark.parametrize("inputs, kwargs, match", [
    (["{tmp}/nowhere.txt"], {}, r"input '.*nowhere\.txt': no such file"),
    (["{tmp}/no-*-match.txt"], {}, r"no-\*-match\.txt"),
    (["{tmp}/blank"], {}, r"no text left after dropping 2 empty"),
    (["{tmp}/empty-dir"], {}, r"empty-dir'?: no text files found"),
    ([], {}, r"inputs: no input"),
    (["{tmp}/blank"], {"tokenizer": "bpe"}, r"vocab=None: tokenizer 'bpe' needs a vocabulary size"),
    (["{tmp}/blank"], {"tokenizer": "bpe", "vocab": 257}, r"vocab=257"),
    (["{tmp}/blank"], {"tokenizer": "byte", "vocab": 500}, r"vocab=500: the byte tokenizer"),
    (["{tmp}/blank"], {"tokenizer": "sentencepiece"}, r"tokenizer='sentencepiece'"),
    (["{tmp}/blank"], {"val_fraction": 1.0}, r"val_fraction=1.0"),
    (["{tmp}/blank"], {"val_fraction": -0.1}, r"val_fraction=-0.1"),
    (["{tmp}/blank"], {"seed": -1}, r"seed=-1: expected a whole number, 0 <= seed < 2\*\*64"),
    (["{tmp}/blank"], {"seed": 2**64}, r"seed=18446744073709551616"),
    (["{tmp}/blank"], {"tokenizer": "bpe", "vocab": 2**31}, r"vocab=2147483648: .* at most 2\*\*24"),
    (["{tmp}/text.txt"], {"out": "{tmp}/text.txt/out"}, r"out: cannot create the directory .*text\.txt/out"),
    (["{tmp}/text.txt"], {"out": "{tmp}/text.txt"}, r"out: .*text\.txt exists and is not a directory"),
])
def test_bad_input_raises_data_error_naming_it(tmp_path, inputs, kwargs, match):
    write(tmp_path / "blank" / "a.txt", "   \n")
    write(tmp_path / "blank" / "b.md", "")
    write(tmp_path / "text.txt", "some text")
    (tmp_path / "empty-dir").mkdir()
    inputs = [s.format(tmp=tmp_path) for s in inputs]
    out = kwargs.pop("out", "{tmp}/out").format(tmp=tmp_path)
    with pytest.raises(DataError, match=match):
        data.prepare(inputs, out, progress=False, **kwargs)
    assert not (tmp_path / "out" / "meta.json").exists() and (tmp_path / "text.txt").read_text() == "some text"


def test_reading_an_unprepared_directory_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match=r"meta\.json not found: .* run `fastcore data prepare`"):
        data.load_meta(tmp_path)
    write(tmp_path / "meta.json", "{not json")
    with pytest.raises(DataError, match=r"meta\.json is unreadable"):
        data.open_split(tmp_path, "train")
    write(tmp_path / "meta.json", json.dumps({"format": 99}))
    with pytest.raises(DataError, match=r"meta\.json is unreadable"):
        data.load_tokenizer(tmp_path)


def test_open_split_checks_the_split_name_and_file_size(tmp_path):
    write(tmp_path / "a.txt", "some text")
    data.prepare([str(tmp_path / "a.txt")], tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"split='test': expected 'train' or 'val'"):
        data.open_split(tmp_path / "out", "test")
    with open(tmp_path / "out" / "train.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=r"train\.bin: 21 bytes, expected 10 uint16 tokens"):
        data.open_split(tmp_path / "out", "train")


def test_progress_on_a_log_writes_lines_and_always_the_final_count():
    stream = io.StringIO()
    with Progress(7, "reading", unit="B", stream=stream) as bar:
        for _ in range(7):
            bar.update(1, loss=1.234567)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1  # the 10 s interval never passed
    assert lines[0].startswith("reading  [####################] 100% 7/7 B") and "loss=1.235" in lines[0]
    bar.close()  # idempotent
    assert stream.getvalue().count("\n") == 1

    stream = io.StringIO()
    bar = Progress(None, "steps", stream=stream, interval=0)
    bar.update(3)
    bar.set_postfix(lr=3e-4)
    bar.update(2)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["steps", "3"], ["steps", "5"], ["steps", "5"]]
    assert lines[-1].endswith("it/s  lr=0.0003")


def test_progress_redraws_in_place_on_a_tty_and_survives_a_closed_stream():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = Progress(100, "tokens", stream=stream, interval=0)
    for _ in range(4):
        bar.update(25)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 5 and text.count("\n") == 1 and text.endswith("\n")
    first, last = text.split("\r")[1], text.split("\r")[-1]
    assert " 25/100" in first and "eta" in first
    assert "100% 100/100" in last and "eta" not in last

    stream.close()
    bar = Progress(10, "closed", stream=stream, interval=0)
    bar.update(5)
    bar.close()
