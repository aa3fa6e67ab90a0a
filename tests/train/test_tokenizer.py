"""Subword tokenizers: exact round trips, bits per byte against hand counts, valid UTF-8 samples,
.jsonl/.parquet corpora, and one-line errors for a missing tokenizer or a vocabulary mismatch."""

from __future__ import annotations

import codecs
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_model, tiny_train, write_corpus

from anydepth.cli import main
from anydepth.train.config import DataConfig, RunConfig
from anydepth.train.data import eval_batch, load_corpus, raw_split, sample_batch
from anydepth.train.tokenizer import Tokenizer, byte_level_alphabet, train_bpe

LN2 = math.log(2)
MIXED = "naïve café, 日本語 ✓ and 🙂\n"  # 2-, 3- and 4-byte characters


def mixed_corpus(path, n_bytes=20_000):
    write_corpus(path, n_bytes)
    path.write_text(path.read_text() + MIXED * 40)
    return path


@pytest.fixture
def tok(tmp_path):
    data = np.frombuffer(mixed_corpus(tmp_path / "train.txt").read_bytes(), dtype=np.uint8)
    t = train_bpe(data, 300, progress=False)
    t.save(tmp_path / "tok.json")
    return t


def hf_bytes(tok: Tokenizer, ids) -> int:
    """Hand count: bytes of the text the ``tokenizers`` library itself decodes (ASCII corpus, so
    no window cuts a character)."""
    return len(tok.hf.decode([int(i) for i in ids]).encode("utf-8"))


def test_byte_alphabet_is_the_libraries_and_tokens_decode_to_their_bytes(tok):
    from tokenizers import pre_tokenizers

    alphabet = byte_level_alphabet()
    assert len(set(alphabet)) == 256 and set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    ids = tok.encode(MIXED + "def f(x):\n\treturn 'Ω'\r\n")
    assert tok.decode_bytes(ids) == (MIXED + "def f(x):\n\treturn 'Ω'\r\n").encode()
    assert tok.hf.decode(ids) == tok.decode(ids)
    assert tok.byte_lengths.tolist() == [len(b) for b in tok.token_bytes] and tok.byte_lengths.min() >= 1


def test_round_trip_is_exact_on_the_training_corpus(tmp_path, tok):
    path = mixed_corpus(tmp_path / "train.txt")
    text = path.read_text()
    assert tok.decode(tok.encode(text)) == text
    cfg = DataConfig(path=str(path), tokenizer=str(tmp_path / "tok.json"), cache_dir=str(tmp_path / "cache"))
    train_ids, val_ids = load_corpus(cfg)
    train_raw, val_raw = raw_split(cfg)
    assert train_ids.dtype == np.uint16 and train_ids.size < train_raw.size
    assert tok.decode_bytes(train_ids.tolist()) == bytes(train_raw)
    assert tok.decode_bytes(val_ids.tolist()) == bytes(val_raw)
    assert bytes(train_raw) + bytes(val_raw) == path.read_bytes()  # the split cuts no character
    again = load_corpus(cfg)  # cached: the same files, mapped again
    assert np.array_equal(again[0], train_ids) and len(list((tmp_path / "cache").glob("ids-*.bin"))) == 2


def test_utf8_processor_only_lets_through_valid_utf8(tok):
    # Random logits stand in for an untrained model: every sampled prefix must still be valid UTF-8.
    process = tok.utf8_processor(tok.vocab_size)
    g = torch.Generator().manual_seed(0)
    out = torch.tensor([tok.encode("x")])
    for _ in range(300):
        logits = process(torch.randn(1, tok.vocab_size, generator=g) * 5, out)
        assert torch.isfinite(logits).any()
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=g)
        out = torch.cat([out, nxt], dim=1)
    data = tok.decode_bytes(out[0].tolist())
    # strict: raises on any malformed byte; final=False keeps an incomplete last character pending
    valid = codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=False)
    assert tok.complete_text(out[0].tolist()) == valid and len(data) - len(valid.encode()) <= 3
    assert any(ord(c) > 127 for c in valid)  # multi-byte characters were sampled, not just avoided


def test_cli_bpe_run_generates_valid_utf8(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mixed_corpus(tmp_path / "c.txt")
    assert main(["tokenize", "--data", "c.txt", "--vocab-size", "300", "--out", "tok.json",
                 "--cache-dir", "cache", "--progress", "False"]) == 0
    assert "tokenizer: tok.json" in capsys.readouterr().out
    n_tok = Tokenizer.from_file("tok.json").vocab_size
    argv = ["train", "--data", "c.txt", "--tokenizer", "tok.json", "--data.cache_dir", "cache", "--out", "run",
            "--model.dim=32", "--model.depth=2", "--model.heads=2", "--model.max_seq_len=64",
            "--train.steps=20", "--train.batch_size=4", "--train.seq_len=32", "--train.eval_every=10",
            "--train.progress=False", "--train.threads=1", "--train.sample_tokens=30", "--train.sample_prompt=café "]
    assert main(argv) == 0
    assert "val bpb" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("ids-*.bin"))) == 2  # train reused what tokenize encoded
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sample"].startswith("café ") and "\ufffd" not in summary["sample"]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000020"
    assert (ckpt / "tokenizer.json").read_text() == (tmp_path / "tok.json").read_text()
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == n_tok
    (tmp_path / "tok.json").unlink()  # generate reads the checkpoint's own copy
    for prompt in ("日本", "def "):
        assert main(["generate", "--checkpoint", "run", "--prompt", prompt, "--max-new-tokens", "30",
                     "--temperature", "1.5", "--top-k", "300"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(prompt) and "\ufffd" not in text
        text.encode("utf-8", errors="strict")  # no lone surrogates either
        assert len(text) > len(prompt) + 5


def bpe_run(tmp_path, **train_kw):
    path = write_corpus(tmp_path / "ascii.txt", 30_000)
    tok = train_bpe(np.frombuffer(path.read_bytes(), dtype=np.uint8), 320, progress=False)
    tok.save(tmp_path / "tok.json")
    cfg = RunConfig(
        model=tiny_model(),  # vocab 256: the tokenizer sets it
        train=tiny_train(**train_kw),
        data=DataConfig(path=str(path), tokenizer=str(tmp_path / "tok.json"), cache_dir=str(tmp_path / "cache")),
        out=str(tmp_path / "run"),
    )
    return cfg, tok


def test_bpe_bpb_uses_the_byte_count_of_the_evaluated_text(tmp_path):
    from anydepth.train.loop import run

    cfg, tok = bpe_run(tmp_path, steps=4, eval_every=2)
    assert cfg.model.vocab_size == tok.vocab_size != 256
    s = run(cfg)
    tc = cfg.train
    train_ids, val_ids = load_corpus(cfg.data)
    n_tokens = n_bytes = 0
    for i in range(tc.eval_batches):
        _, y = eval_batch(val_ids, index=i, n_batches=tc.eval_batches, batch_size=tc.batch_size, seq_len=tc.seq_len)
        n_tokens += y.numel()
        n_bytes += sum(hf_bytes(tok, row) for row in y.tolist())
    assert n_bytes > 1.5 * n_tokens  # subwords: the two units really differ
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in lines if "val_loss" in r]
    for r in val:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / LN2 * n_tokens / n_bytes, rel=1e-12)
        assert "val_bpc" not in r
    assert s["final_val_bpb"] == pytest.approx(val[-1]["val_bpb"], rel=1e-12) and s["final_val_bpc"] is None
    for r in (r for r in lines if "train_loss" in r):  # log_every=1: one step per line
        _, y = sample_batch(train_ids, step=r["step"] - 1, seed=tc.seed, batch_size=tc.batch_size, seq_len=tc.seq_len)
        batch_bytes = sum(hf_bytes(tok, row) for row in y.tolist())
        assert r["train_bpb"] == pytest.approx(r["train_loss"] / LN2 * y.numel() / batch_bytes, rel=1e-12)
    head = np.asarray(train_ids)
    p = np.bincount(head.astype(np.int64)) / head.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert s["unigram_bits"] == pytest.approx(entropy)
    assert s["unigram_bpb"] == pytest.approx(entropy * head.size / hf_bytes(tok, head.tolist()))


def test_byte_level_bpb_equals_bpc(make_run):
    from anydepth.train.loop import run

    cfg = make_run(steps=4, eval_every=2)
    s = run(cfg)
    lines = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_bpb"] for r in lines if "train_bpc" in r] == [r["train_bpc"] for r in lines if "train_bpc" in r]
    assert [r["val_bpb"] for r in lines if "val_bpc" in r] == [r["val_bpc"] for r in lines if "val_bpc" in r]
    assert len([r for r in lines if "val_bpb" in r]) == 2
    assert s["final_val_bpb"] == s["final_val_bpc"] and s["final_train_bpb"] == s["final_train_bpc"]
    assert s["unigram_bpb"] == s["unigram_bits"] and s["tokenizer"] is None


def one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    return err


def test_missing_tokenizer_and_vocab_mismatch_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from anydepth.train.loop import run

    monkeypatch.chdir(tmp_path)
    cfg, tok = bpe_run(tmp_path, steps=2, eval_every=0, sample_tokens=0)
    run(cfg)
    small = train_bpe(np.frombuffer((tmp_path / "ascii.txt").read_bytes(), dtype=np.uint8), 260, progress=False)
    assert small.vocab_size != tok.vocab_size
    small.save(tmp_path / "small.json")
    one_line_error(capsys, ["train", "--data", "ascii.txt", "--tokenizer", "nope.json"], "'nope.json' does not exist")
    one_line_error(
        capsys,
        ["train", "--data", "ascii.txt", "--tokenizer", "tok.json", "--model.vocab_size=300"],
        f"model.vocab_size=300 does not match the {tok.vocab_size} tokens",
    )
    one_line_error(capsys, ["generate", "--checkpoint", "run", "--tokenizer", "nope.json"], "does not exist")
    one_line_error(
        capsys,
        ["generate", "--checkpoint", "run", "--tokenizer", "small.json"],
        f"vocab_size={tok.vocab_size} but tokenizer small.json has {small.vocab_size} tokens",
    )
    from tokenizers import normalizers

    lower = Tokenizer.from_file("tok.json").hf
    lower.normalizer = normalizers.Lowercase()  # same vocabulary, but "Def" encodes as "def"
    Tokenizer(lower).save("lower.json")
    one_line_error(
        capsys,
        ["generate", "--checkpoint", "run", "--tokenizer", "lower.json", "--prompt", "Def"],
        "--prompt 'Def' cannot be encoded exactly by tokenizer lower.json (it decodes to 'def')",
    )
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    (ckpt / "tokenizer.json").unlink()
    one_line_error(capsys, ["generate", "--checkpoint", str(ckpt)], "is missing")
    with pytest.raises(ValueError, match="does not match the"):
        RunConfig(model=tiny_model(vocab_size=300), data=DataConfig(tokenizer=str(tmp_path / "tok.json")))


def test_jsonl_and_parquet_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document {i}: {'é' * (i % 3)} " + "word " * (i % 17) for i in range(200)]
    expected = "\n\n".join(docs).encode()
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)) + "\n")
    pq.write_table(pa.table({"body": docs[:100]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": docs[100:]}), tmp_path / "b.parquet")
    d = tmp_path / "pq"
    d.mkdir()
    (tmp_path / "a.parquet").rename(d / "a.parquet")
    (tmp_path / "b.parquet").rename(d / "b.parquet")
    for path in (jl, d / "a.parquet"):
        cfg = DataConfig(path=str(path), text_field="body", cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
        train, val = load_corpus(cfg)
        want = expected if path == jl else "\n\n".join(docs[:100]).encode()
        assert bytes(train) + bytes(val) == want
        n_val = int(round(len(want) * 0.1))
        assert bytes(val) == want[len(want) - n_val :]  # the contiguous tail, whatever the seed
    train, val = load_corpus(DataConfig(path=str(d), text_field="body", cache_dir=str(tmp_path / "cache")))
    # files are concatenated in sorted order; each file's documents are separated by a blank line
    assert bytes(train) + bytes(val) == "\n\n".join(docs[:100]).encode() + "\n\n".join(docs[100:]).encode()
    with pytest.raises(ValueError, match=r"line 1 has no string field 'text' \(it has body, id\); set --data.text"):
        load_corpus(DataConfig(path=str(jl), cache_dir=str(tmp_path / "cache")))
    with pytest.raises(ValueError, match=r"has no column 'text' \(columns: body\); set --data.text_field"):
        load_corpus(DataConfig(path=str(d / "b.parquet"), cache_dir=str(tmp_path / "cache")))
