"""Pruned models exported by FedSpine (https://arxiv.org/abs/2501.02438): stock transformers classes whose
attention and FFN projections have the per-layer sizes recorded in config.json.

Load with ``AutoModelFor…from_pretrained(folder, trust_remote_code=True)``.  This file needs nothing but torch
and transformers: ``fedspine_linear`` maps each resized projection to (out_features, in_features, bias) and
``fedspine_attrs`` sets the head counts the attention modules use in their forward pass.
"""

import transformers
from torch import nn


def _reshape(model, config):
    for name, (out_f, in_f, bias) in getattr(config, "fedspine_linear", {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, nn.Linear(in_f, out_f, bias=bias, device=old.weight.device, dtype=old.weight.dtype))
    for name, attrs in getattr(config, "fedspine_attrs", {}).items():
        module = model.get_submodule(name)
        for key, value in attrs.items():
            setattr(module, key, value)


def _pruned(base_name):
    base = getattr(transformers, base_name)

    class Pruned(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            _reshape(self, config)

    Pruned.__name__ = Pruned.__qualname__ = "FedSpine" + base_name
    return Pruned


# One line per class in edge_node/model.py SUPPORTED (tests/edge_node/test_export.py checks both agree).
FedSpineBertForSequenceClassification = _pruned("BertForSequenceClassification")
FedSpineRobertaForSequenceClassification = _pruned("RobertaForSequenceClassification")
FedSpineXLMRobertaForSequenceClassification = _pruned("XLMRobertaForSequenceClassification")
FedSpineDistilBertForSequenceClassification = _pruned("DistilBertForSequenceClassification")
FedSpineLlamaForCausalLM = _pruned("LlamaForCausalLM")
FedSpineLlamaForSequenceClassification = _pruned("LlamaForSequenceClassification")
FedSpineMistralForCausalLM = _pruned("MistralForCausalLM")
FedSpineMistralForSequenceClassification = _pruned("MistralForSequenceClassification")
FedSpineQwen2ForCausalLM = _pruned("Qwen2ForCausalLM")
FedSpineQwen2ForSequenceClassification = _pruned("Qwen2ForSequenceClassification")
