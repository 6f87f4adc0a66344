"""Local data: CSV/JSONL reading, label order, tokenisation for both tasks, deterministic split and batching."""

from __future__ import annotations

import json

import pytest
import torch

from edge_node.data import (
    BatchStream,
    collate,
    encode_causal,
    encode_classification,
    fixed_batches,
    label_list,
    mean_batch_width,
    read_records,
    split_indices,
)
from edge_node.model import load_tokenizer
from tests.edge_node.tiny import cached_model_folder


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(cached_model_folder("bert")))


def test_csv_utf8_latin1_and_jsonl(tmp_path):
    (tmp_path / "u.csv").write_text("text,label\ncafé good,pos\n\"a, b\",neg\n", encoding="utf-8")
    (tmp_path / "l.csv").write_bytes("sentiment,confidence,text\n4,1,caf\xe9 nice\n".encode("latin-1"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x", "label": 1}) + "\n\n" + json.dumps({"text": "y",
                                                                                                  "label": 0}))
    assert read_records(tmp_path / "u.csv") == [{"text": "café good", "label": "pos"}, {"text": "a, b", "label": "neg"}]
    assert read_records(tmp_path / "l.csv") == [{"sentiment": "4", "confidence": "1", "text": "café nice"}]
    assert read_records(tmp_path / "d.jsonl") == [{"text": "x", "label": "1"}, {"text": "y", "label": "0"}]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")


def test_label_order_and_mapping(tok):
    assert label_list(["10", "2", "0", "2"]) == ["0", "2", "10"]
    assert label_list(["pos", "neg", "neutral"]) == ["neg", "neutral", "pos"]
    rows = [{"text": "good day", "sentiment": "4"}, {"text": "bad day", "sentiment": "0"}]
    enc, names = encode_classification(rows, tok, 16)
    assert names == ["0", "4"] and enc.targets == [1, 0]
    enc, names = encode_classification(rows, tok, 16, labels=["4", "2", "0"])
    assert names == ["4", "2", "0"] and enc.targets == [0, 2]
    with pytest.raises(ValueError, match="not in the label list"):
        encode_classification(rows, tok, 16, labels=["0", "2"])
    with pytest.raises(ValueError, match="no label column"):
        encode_classification([{"text": "x"}], tok, 16)


def test_causal_completion_only_loss_and_text(tok):
    enc = encode_causal([{"prompt": "the cat is", "completion": "red red"}, {"text": "one two three"}], tok, 32)
    ids, tgt = enc.input_ids[0], enc.targets[0]
    n_prompt = len(tok("the cat is")["input_ids"])
    assert tgt[:n_prompt] == [-100] * n_prompt
    assert tgt[n_prompt:n_prompt + 2] == tok("red red", add_special_tokens=False)["input_ids"]
    assert len(ids) == len(tgt)
    assert enc.targets[1] == enc.input_ids[1]
    short = encode_causal([{"prompt": "the cat is red so", "completion": "blue"}], tok, 4)
    assert len(short) == 0  # truncated away: no completion tokens left to learn from


def test_split_is_deterministic_disjoint_and_complete():
    tr, va = split_indices(100, 0.1, seed=3)
    assert (tr, va) == split_indices(100, 0.1, seed=3)
    assert len(va) == 10 and sorted(tr + va) == list(range(100))
    assert split_indices(100, 0.1, seed=4)[1] != va
    assert split_indices(2, 0.1, 0)[1] and split_indices(2, 0.1, 0)[0]
    with pytest.raises(ValueError):
        split_indices(1, 0.1, 0)


def test_collate_padding_and_batch_stream(tok):
    rows = [{"text": " ".join(["good"] * (i % 5 + 1)), "label": str(i % 2)} for i in range(10)]
    enc, _ = encode_classification(rows, tok, 16)
    batch = collate(enc, [0, 4], tok.pad_token_id, causal=False)
    assert batch["input_ids"].shape == (2, 7) and batch["attention_mask"].sum(1).tolist() == [3, 7]
    assert batch["labels"].tolist() == [0, 0]
    s1, s2 = BatchStream(enc, list(range(10)), 4, 0, False, seed=1), BatchStream(enc, list(range(10)), 4, 0, False,
                                                                                   seed=1)
    seen = []
    for _ in range(5):
        a, b = next(s1), next(s2)
        assert torch.equal(a["input_ids"], b["input_ids"])
        seen.append(a)
    assert s1.epoch == 2
    lengths = [len(x) for x in enc.input_ids]
    # the mean padded width: whole epochs of one-example batches give the mean length; one batch of all, the longest
    assert mean_batch_width(enc, list(range(10)), 1, seed=3, batches=20) == pytest.approx(sum(lengths) / 10)
    assert mean_batch_width(enc, list(range(10)), 10, seed=3, batches=4) == max(lengths)
    assert sum(lengths) / 10 < mean_batch_width(enc, list(range(10)), 4, seed=3) < max(lengths)
    assert len(fixed_batches(enc, list(range(10)), 4, 0, False, 2)) == 2
    assert len(fixed_batches(enc, list(range(10)), 4, 0, False, None)) == 3
    lm = encode_causal([{"prompt": "a", "completion": "red"}, {"prompt": "the dog is", "completion": "blue"}], tok, 16)
    cb = collate(lm, [0, 1], tok.pad_token_id, causal=True)
    assert cb["labels"].shape == cb["input_ids"].shape
    assert (cb["labels"][cb["attention_mask"] == 0] == -100).all()
