"""The node's private data: CSV/JSONL reading, label mapping, tokenisation, deterministic split and batching."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_KEYS = ("text", "sentence", "content")
LABEL_KEYS = ("label", "labels", "sentiment", "class")


class DataError(ValueError):
    """A node's data file cannot be used as it is (format, columns, labels, too few examples)."""


def read_records(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV (header line; UTF-8, else latin-1) or JSONL file as dicts of strings."""
    p = Path(path)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n}: each line must be a JSON object")
            rows.append({str(k): "" if v is None else str(v) for k, v in obj.items()})
        return rows
    return [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]


def _field(row: dict[str, str], keys: Sequence[str], what: str, where: str) -> str:
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    raise DataError(f"{where}: no {what} column (looked for {list(keys)}; have {sorted(row)})")


def label_list(values: Sequence[str]) -> list[str]:
    """Deterministic label order: numerically if every label is an integer, else as sorted strings."""
    uniq = sorted(set(values))
    try:
        return sorted(uniq, key=int)
    except ValueError:
        return uniq


@dataclass
class Encoded:
    """Tokenised examples: input ids, and a class id (seq_cls) or per-token labels (causal_lm)."""

    input_ids: list[list[int]]
    targets: list[int] | list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_classification(rows: list[dict[str, str]], tokenizer, max_length: int,
                          labels: Sequence[str] | None = None, where: str = "data") -> tuple[Encoded, list[str]]:
    texts = [_field(r, TEXT_KEYS, "text", where) for r in rows]
    raw = [_field(r, LABEL_KEYS, "label", where).strip() for r in rows]
    names = list(labels) if labels else label_list(raw)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not in the label list {names}")
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(list(ids), [index[x] for x in raw]), names


def encode_causal(rows: list[dict[str, str]], tokenizer, max_length: int, where: str = "data") -> Encoded:
    """prompt + completion with the loss on the completion only, or plain ``text`` with the loss everywhere."""
    eos = tokenizer.eos_token_id
    ids_all: list[list[int]] = []
    targets: list[list[int]] = []
    for r in rows:
        if "prompt" in r and "completion" in r:
            p = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
            c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            ids = (p + c)[:max_length]
            tgt = ([-100] * len(p) + c)[:max_length]
        else:
            ids = tokenizer(_field(r, TEXT_KEYS, "text", where), truncation=True, max_length=max_length)["input_ids"]
            tgt = list(ids)
        if any(t != -100 for t in tgt[1:]):
            ids_all.append(list(ids))
            targets.append(tgt)
    return Encoded(ids_all, targets)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) split of ``range(n)``; both non-empty when n >= 2."""
    if n < 2:
        raise DataError(f"need at least 2 examples to split, have {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def collate(data: Encoded, idx: Sequence[int], pad_id: int, causal: bool) -> dict[str, torch.Tensor]:
    """Right-padded batch (padded to the longest example in it)."""
    seqs = [data.input_ids[i] for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long) if causal else None
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.as_tensor(s)
        mask[row, : len(s)] = 1
        if labels is not None:
            t = data.targets[idx[row]]
            labels[row, : len(t)] = torch.as_tensor(t)
    if not causal:
        labels = torch.as_tensor([data.targets[i] for i in idx], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchStream:
    """Endless shuffled batches over a subset, reshuffled each epoch with a seeded generator."""

    def __init__(self, data: Encoded, indices: Sequence[int], batch_size: int, pad_id: int, causal: bool,
                 seed: int) -> None:
        if not indices:
            raise DataError("no training examples")
        self.data, self.indices, self.batch_size = data, list(indices), batch_size
        self.pad_id, self.causal = pad_id, causal
        self.gen = torch.Generator().manual_seed(seed + 1)
        self._order: list[int] = []
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def next_indices(self) -> list[int]:
        """The example indices of the next batch (what ``next`` collates)."""
        while len(self._order) < self.batch_size:
            perm = torch.randperm(len(self.indices), generator=self.gen).tolist()
            self._order.extend(self.indices[i] for i in perm)
            self.epoch += 1
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size:]
        return batch

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate(self.data, self.next_indices(), self.pad_id, self.causal)


def mean_batch_width(data: Encoded, indices: Sequence[int], batch_size: int, seed: int, batches: int = 256) -> float:
    """Mean padded width (the longest example of each batch) of ``batches`` batches of a ``BatchStream`` seeded with
    ``seed``: the tokens per row an average local step computes on.  Lengths only, no tensors."""
    stream = BatchStream(data, indices, batch_size, pad_id=0, causal=False, seed=seed)
    return sum(max(len(data.input_ids[i]) for i in stream.next_indices()) for _ in range(batches)) / batches


def fixed_batches(data: Encoded, indices: Sequence[int], batch_size: int, pad_id: int, causal: bool,
                  max_batches: int | None) -> list[dict[str, torch.Tensor]]:
    """The first ``max_batches`` batches of ``indices`` in order (the same batches every round)."""
    out = []
    for start in range(0, len(indices), batch_size):
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(collate(data, indices[start:start + batch_size], pad_id, causal))
    return out
