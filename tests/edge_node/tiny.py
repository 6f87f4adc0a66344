"""Tiny random model folders of every supported model type (decoders with GQA) and a small WordPiece tokenizer."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["good", "great", "happy", "love", "fine", "nice", "bad", "awful", "sad", "hate", "poor", "ugly",
         "the", "a", "day", "movie", "food", "is", "was", "very", "and", "it", "this", "not", "so", "really",
         "red", "blue", "green", "one", "two", "three", "yes", "no", "cat", "dog", "sun", "rain", "tea", "car"]
POSITIVE, NEGATIVE = WORDS[:6], WORDS[6:12]
FILLER = WORDS[12:]


def write_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}, do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def tiny_config(kind: str, vocab_size: int, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 64, layers: int = 2):
    """A random-weight config of model type ``kind`` (a key of edge_node.model.SUPPORTED, or gpt2)."""
    from transformers import (
        BertConfig,
        DistilBertConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        RobertaConfig,
        XLMRobertaConfig,
    )

    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=128,
                          pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind in ("roberta", "xlm-roberta"):
        return (RobertaConfig if kind == "roberta" else XLMRobertaConfig)(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=130,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    if kind == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, dim=hidden, n_layers=layers, n_heads=heads,
                                hidden_dim=intermediate, max_position_embeddings=128, pad_token_id=0, dropout=0.0,
                                attention_dropout=0.0, seq_classif_dropout=0.0)
    decoders = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}  # qwen2: q/k/v biases
    if kind in decoders:
        return decoders[kind](vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                              intermediate_size=intermediate, max_position_embeddings=128, pad_token_id=0,
                              bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    if kind == "gpt2":  # a model type the node does not support
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                          bos_token_id=2, eos_token_id=3)
    raise ValueError(kind)


def make_model_folder(folder: Path, kind: str, task: str = "seq_cls", seed: int = 0, **sizes) -> Path:
    """Save a tiny random model of ``kind`` (+ tokenizer) to ``folder`` and return it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = write_tokenizer(folder)
    cfg = tiny_config(kind, len(tok), **sizes)
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    model = cls.from_config(cfg)
    model.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """An easy synthetic task: the label is whether a positive or negative word appears."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def lm_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A learnable causal LM task: the completion repeats the prompt's colour."""
    rng = random.Random(seed)
    colours = ["red", "blue", "green"]
    rows = []
    for _ in range(n):
        c = rng.choice(colours)
        rows.append({"prompt": f"the {rng.choice(['cat', 'dog', 'car'])} is {c} so", "completion": f"{c} {c}"})
    return rows


_CACHE: dict[tuple[str, str], Path] = {}


def cached_model_folder(kind: str, task: str = "seq_cls") -> Path:
    """A tiny model folder built once per test process (under a temporary directory)."""
    import tempfile

    key = (kind, task)
    if key not in _CACHE:
        _CACHE[key] = make_model_folder(Path(tempfile.mkdtemp(prefix=f"tiny-{kind}-")), kind, task)
    return _CACHE[key]


def load_lora_model(kind: str, task: str = "seq_cls", rank: int = 4, num_labels: int = 3, seed: int = 0):
    """A tiny model of ``kind`` with LoRA attached, B randomised so the update is non-zero (fp32, CPU, eval)."""
    from edge_node.model import attach_lora, load_base_model, lora_layers

    folder = cached_model_folder(kind, task)
    model = load_base_model(str(folder), task, num_labels=num_labels if task == "seq_cls" else None)
    model = attach_lora(model, rank=rank, alpha=8.0, task=task)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.eval()


def random_batch(batch: int = 3, length: int = 10, vocab: int = len(SPECIAL) + len(WORDS), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length - 3:] = 0  # one padded row exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}
