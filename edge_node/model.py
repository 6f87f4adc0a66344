"""Model loading (offline), device/dtype choice, LoRA via peft, rank change and per-architecture prunable groups."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# ---- architecture adapters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable modules of one architecture family live (names relative to a layer)."""

    layers: str  # path of the layer list relative to the base transformers model ("{prefix}" = base prefix)
    attn: str  # the attention module whose head-count attributes are updated on pruning
    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]  # up (and gate): output rows are FFN channels
    ffn_out: str  # down: input columns are FFN channels
    mlp: str | None  # module holding ``intermediate_size`` (Llama), if any
    heads: dict[str, str]  # model.config attribute names: n_heads, n_kv_heads, hidden, intermediate


_ENCODER = ArchSpec(
    layers="{prefix}.encoder.layer", attn="attention.self", q="attention.self.query", k="attention.self.key",
    v="attention.self.value", o="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense",
    mlp=None, heads={"n_heads": "num_attention_heads", "hidden": "hidden_size", "intermediate": "intermediate_size"},
)
_DISTILBERT = ArchSpec(
    layers="distilbert.transformer.layer", attn="attention", q="attention.q_lin", k="attention.k_lin",
    v="attention.v_lin", o="attention.out_lin", ffn_in=("ffn.lin1",), ffn_out="ffn.lin2", mlp=None,
    heads={"n_heads": "n_heads", "hidden": "dim", "intermediate": "hidden_dim"},
)
_LLAMA = ArchSpec(
    layers="model.layers", attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
    o="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj", mlp="mlp",
    heads={"n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "hidden": "hidden_size",
           "intermediate": "intermediate_size"},
)
TASKS = ("seq_cls", "causal_lm")


@dataclass(frozen=True)
class Architecture:
    """One supported model type: its prunable modules, and per task the transformers class the node trains (the
    export template has a pruned variant of each, tests/edge_node/test_export.py round-trips every one)."""

    spec: ArchSpec
    classes: dict[str, str]  # task -> transformers class name
    head: tuple[str, ...] = ()  # seq_cls: the task head modules, trained fully (peft modules_to_save)


def _decoder(name: str) -> Architecture:
    return Architecture(_LLAMA, {"seq_cls": f"{name}ForSequenceClassification", "causal_lm": f"{name}ForCausalLM"},
                        ("score",))


# Encoders are classifiers only: a causal LM node needs a decoder (BERT's and RoBERTa's causal LM classes are
# encoder-decoder parts that need an is_decoder config, DistilBERT has none, and the export has no variant of them).
SUPPORTED: dict[str, Architecture] = {
    "bert": Architecture(_ENCODER, {"seq_cls": "BertForSequenceClassification"}, ("classifier",)),
    "roberta": Architecture(_ENCODER, {"seq_cls": "RobertaForSequenceClassification"}, ("classifier",)),
    "xlm-roberta": Architecture(_ENCODER, {"seq_cls": "XLMRobertaForSequenceClassification"}, ("classifier",)),
    "distilbert": Architecture(_DISTILBERT, {"seq_cls": "DistilBertForSequenceClassification"},
                               ("pre_classifier", "classifier")),
    "llama": _decoder("Llama"),
    "mistral": _decoder("Mistral"),
    "qwen2": _decoder("Qwen2"),
}


def supported_cases() -> list[tuple[str, str]]:
    """Every (model type, task) the node trains, prunes and exports."""
    return [(mt, task) for mt, a in SUPPORTED.items() for task in a.classes]


def check_supported(model_type: str, task: str, where: str = "") -> str:
    """The transformers class a node trains for ``model_type`` and ``task``; a ConfigError naming both (and
    what is supported) for anything else, so that a node refuses at start-up rather than fail at export."""
    from shared.config import ConfigError

    at = f" ({where})" if where else ""
    if task not in TASKS:
        raise ConfigError(f"task {task!r} must be one of {', '.join(TASKS)}")
    arch = SUPPORTED.get(model_type)
    if arch is None:
        raise ConfigError(f"model type {model_type!r}{at} is not supported: a node trains, prunes and exports "
                          f"{', '.join(sorted(SUPPORTED))}")
    if task not in arch.classes:
        able = sorted(mt for mt, a in SUPPORTED.items() if task in a.classes)
        raise ConfigError(f"model type {model_type!r}{at} is not supported for task {task!r} (it supports "
                          f"{', '.join(arch.classes)}); task {task!r} needs one of {', '.join(able)}")
    return arch.classes[task]


@dataclass(frozen=True)
class LayerGeometry:
    """The unpruned sizes of one transformer layer's prunable groups."""

    index: int
    prefix: str  # e.g. "bert.encoder.layer.3" (relative to the transformers model)
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (== n_heads without GQA); a prunable head group is one KV head
    head_dim: int
    hidden: int
    intermediate: int

    @property
    def q_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def name(self, rel: str) -> str:
        return f"{self.prefix}.{rel}"


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def arch_of(model: nn.Module) -> ArchSpec:
    mt = getattr(unwrap(model).config, "model_type", "")
    if mt not in SUPPORTED:
        raise ValueError(f"model type {mt!r} is not supported (supported: {', '.join(sorted(SUPPORTED))})")
    return SUPPORTED[mt].spec


def layer_geometry(model: nn.Module) -> list[LayerGeometry]:
    """The unpruned geometry of every prunable layer, from the model's config."""
    base = unwrap(model)
    cfg = base.config
    spec = arch_of(base)
    n_heads = int(getattr(cfg, spec.heads["n_heads"]))
    n_kv = int(getattr(cfg, spec.heads.get("n_kv_heads", ""), None) or n_heads)
    hidden = int(getattr(cfg, spec.heads["hidden"]))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_heads)
    inter = int(getattr(cfg, spec.heads["intermediate"]))
    path = spec.layers.format(prefix=getattr(base, "base_model_prefix", ""))
    n_layers = len(base.get_submodule(path))
    return [LayerGeometry(i, f"{path}.{i}", n_heads, n_kv, head_dim, hidden, inter) for i in range(n_layers)]


def prunable_layers(model: nn.Module) -> list[LayerGeometry]:
    """Alias of :func:`layer_geometry` (the introspection the export code reads)."""
    return layer_geometry(model)


def lora_target_names(model: nn.Module) -> list[str]:
    """Full names of every module that gets LoRA: q, k, v, o and the FFN projections of every layer."""
    spec = arch_of(model)
    names: list[str] = []
    for g in layer_geometry(model):
        for rel in (spec.q, spec.k, spec.v, spec.o, *spec.ffn_in, spec.ffn_out):
            names.append(g.name(rel))
    return names


# ---- device, dtype, loading ----------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        # a setting this machine cannot honour: a configuration error (exit 2), not a restart loop
        from shared.config import ConfigError

        raise ConfigError(f"[node] device {device!r}: CUDA is not available to this torch {torch.__version__} "
                          "(on a Jetson, install NVIDIA's JetPack wheel; or set device = \"auto\" or \"cpu\")")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA where supported, else fp16 on CUDA, fp32 on CPU (frozen base only)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} must be auto, float32, float16 or bfloat16")
    return table[dtype]


def load_base_model(path: str, task: str, *, num_labels: int | None = None, dtype: torch.dtype = torch.float32,
                    labels: Sequence[str] | None = None):
    """Load a local Hugging Face folder offline (never touches the Hub).

    ``labels`` (sequence classification): the class names in label order; they go into the config's
    ``id2label`` / ``label2id``, so an exported model (and a ``pipeline`` over it) names its classes.

    An architecture or task the node cannot train, prune and export is refused here, from the folder's
    config.json and before any weight is read (a ConfigError: the node exits at start-up, before joining)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    expected = check_supported(model_type, task, where=str(path))
    kw: dict = {"local_files_only": True, "dtype": dtype}
    if task == "seq_cls":
        if labels:
            if num_labels is not None and num_labels != len(labels):
                raise ValueError(f"num_labels {num_labels} but {len(labels)} label names")
            if len(set(labels)) != len(labels):
                raise ValueError(f"label names {list(labels)} repeat")
            num_labels = len(labels)
            kw["id2label"] = {i: str(name) for i, name in enumerate(labels)}
            kw["label2id"] = {str(name): i for i, name in enumerate(labels)}
        if not num_labels or num_labels < 2:
            raise ValueError(f"sequence classification needs >= 2 labels, got {num_labels}")
        # A folder that already has a head for another label count gets a fresh one for ours.
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if type(model).__name__ != expected:  # transformers mapped the config elsewhere: no export for it
        raise ValueError(f"{path}: transformers loaded {type(model).__name__}, the node supports {expected}")
    return model


def base_model_digest(path: str) -> str:
    """SHA-256 that identifies a local model folder's base model: of the text ``sha256sum`` prints for its
    ``config.json`` and the weight files transformers loads (``*.safetensors``, else ``*.bin``), in byte order of
    their names.  Every node of a fleet must start from the same base weights, since a LoRA update only means
    something on top of the weights it was trained on; an operator checks a Jetson's copy with
    ``cd MODEL && ls config.json *.safetensors | LC_ALL=C sort | xargs sha256sum | sha256sum``."""
    folder = Path(path)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weight files")
    files = sorted([folder / "config.json", *weights], key=lambda f: f.name.encode())
    listing = []
    for f in files:
        with open(f, "rb") as fh:
            listing.append(f"{hashlib.file_digest(fh, 'sha256').hexdigest()}  {f.name}\n")
    return hashlib.sha256("".join(listing).encode()).hexdigest()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def attach_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0, task: str = "seq_cls"):
    """Wrap ``model`` with peft LoRA on every attention and FFN projection; the task head is trained fully.

    LoRA factors (and the trained task head) are kept in fp32 whatever the base dtype.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be >= 1")
    mt = unwrap(model).config.model_type
    heads = list(SUPPORTED[mt].head) if task == "seq_cls" and mt in SUPPORTED else []
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_names(model),
                     modules_to_save=heads or None, bias="none")
    peft_model = get_peft_model(model, cfg)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every peft LoRA layer by its name relative to the transformers model."""
    from peft.tuners.lora import LoraLayer

    base = unwrap(model)
    return {name: mod for name, mod in base.named_modules() if isinstance(mod, LoraLayer)}


def lora_factors(layer: nn.Module, adapter: str = "default") -> tuple[nn.Linear, nn.Linear, float]:
    return layer.lora_A[adapter], layer.lora_B[adapter], float(layer.scaling[adapter])


def set_lora(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, alpha: float, adapter: str = "default") -> None:
    """Replace a LoRA layer's factors (any rank); scale becomes alpha / rank."""
    r = A.shape[0]
    lin_a, lin_b = layer.lora_A[adapter], layer.lora_B[adapter]
    dev = lin_a.weight.device
    lin_a.weight = nn.Parameter(A.detach().to(dev, torch.float32).contiguous())
    lin_b.weight = nn.Parameter(B.detach().to(dev, torch.float32).contiguous())
    lin_a.in_features, lin_a.out_features = A.shape[1], r
    lin_b.in_features, lin_b.out_features = r, B.shape[0]
    layer.r[adapter] = r
    layer.lora_alpha[adapter] = alpha
    layer.scaling[adapter] = alpha / r


def kaiming_rows(n: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` fresh LoRA A rows initialised like peft (kaiming-uniform, a = sqrt(5))."""
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on fan_in
    return (torch.rand(n, in_features, generator=generator) * 2 - 1) * bound


def refactor(B: torch.Tensor, A: torch.Tensor, scale: float, rank: int, new_scale: float,
             generator: torch.Generator | None = None, rel_tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (B', A') with ``new_scale * B' @ A' ≈ scale * B @ A`` (truncated SVD).

    Works through QR of the factors, so the cost is O((out + in) r^2) and the dense product is never formed.
    Components with (near) zero singular value are re-initialised like peft (kaiming-uniform A row, zero B
    column) so that training can use them.
    """
    B = B.detach().float().cpu()
    A = A.detach().float().cpu()
    out_f, in_f = B.shape[0], A.shape[1]
    qb, rb = torch.linalg.qr(B)  # B = qb rb
    qa, ra = torch.linalg.qr(A.T)  # A^T = qa ra
    u, s, vh = torch.linalg.svd(scale * rb @ ra.T)
    k = min(rank, s.numel())
    s_top = s[:k]
    s_max = float(s[0]) if s.numel() else 0.0
    alive = (s_top > rel_tol * s_max) & (s_top > 0)
    root = torch.sqrt(s_top / new_scale)
    new_b = torch.zeros(out_f, rank)
    new_a = kaiming_rows(rank, in_f, generator)
    new_b[:, :k] = torch.where(alive, root, torch.zeros_like(root)) * (qb @ u[:, :k])
    live_a = root.unsqueeze(1) * (vh[:k] @ qa.T)
    new_a[:k] = torch.where(alive.unsqueeze(1), live_a, new_a[:k])
    return new_b, new_a


def change_rank(model: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
    """Set every LoRA layer to ``rank`` without losing the learned update.

    Shrink: truncated SVD of ``scale * B @ A``.  Grow: the existing components are kept (B rescaled to the
    new scale) and the extra ones start as fresh A rows with zero B columns, so ``B @ A`` is unchanged.
    """
    new_scale = alpha / rank
    for layer in lora_layers(model).values():
        lin_a, lin_b, scale = lora_factors(layer)
        old = lin_a.weight.shape[0]
        if old == rank and math.isclose(scale, new_scale):
            continue
        if rank >= old:
            extra = kaiming_rows(rank - old, lin_a.weight.shape[1], generator).to(lin_a.weight.device)
            A = torch.cat([lin_a.weight.detach().float(), extra])
            B = torch.cat([lin_b.weight.detach().float() * (scale / new_scale),
                           torch.zeros(lin_b.weight.shape[0], rank - old, device=lin_b.weight.device)], dim=1)
        else:
            B, A = refactor(lin_b.weight, lin_a.weight, scale, rank, new_scale, generator)
        set_lora(layer, A, B, alpha)


def current_rank(model: nn.Module) -> int:
    ranks = {int(lay.lora_A["default"].weight.shape[0]) for lay in lora_layers(model).values()}
    if len(ranks) != 1:
        raise RuntimeError(f"LoRA layers disagree on rank: {sorted(ranks)}")
    return ranks.pop()


def task_head_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable non-LoRA parameters (the task head), by name relative to the transformers model."""
    out: dict[str, nn.Parameter] = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad and ".lora_" not in name:
            out[name.replace(".modules_to_save.default", "")] = p
    return out
