"""Tiny Hugging Face transformers built from configs in code (nothing downloaded), and their example inputs."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


def tiny(kind: str, seed: int = 0):
    """One of the eight model types of issue 21 (and GPT-NeoX: q, k, v interleaved per head, partial rotary), with
    random weights from ``seed`` (eval mode)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    text = dict(vocab_size=VOCAB, max_position_embeddings=32)
    configs = {
        "gpt2": lambda: (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                                            n_head=4, bos_token_id=0, eos_token_id=0)),
        "bert": lambda: (tf.BertForMaskedLM, tf.BertConfig(**text, **SMALL)),
        "roberta": lambda: (tf.RobertaForMaskedLM, tf.RobertaConfig(**text, **SMALL, pad_token_id=1)),
        "distilbert": lambda: (tf.DistilBertForMaskedLM, tf.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=32,
                                                                            dim=32, n_layers=2, n_heads=4, hidden_dim=48)),
        "llama": lambda: (tf.LlamaForCausalLM, tf.LlamaConfig(**text, **SMALL, num_key_value_heads=2)),
        "mistral": lambda: (tf.MistralForCausalLM, tf.MistralConfig(**text, **SMALL, num_key_value_heads=2)),
        "qwen2": lambda: (tf.Qwen2ForCausalLM, tf.Qwen2Config(**text, **SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
        "gpt_neox": lambda: (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**text, **SMALL, rotary_pct=0.5)),
        "vit": lambda: (tf.ViTForImageClassification, tf.ViTConfig(**SMALL, image_size=16, patch_size=4, num_labels=5)),
    }
    cls, config = configs[kind]()
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # norms' weights and biases off their 1 / 0 init: a spec that forgets them fails
        for name, tensor in model.named_parameters():
            if tensor.dim() == 1:
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return model


def example(model, batch: int = 2, length: int = 8, seed: int = 0) -> dict:
    """input_ids with an attention mask that pads the last sample; pixel_values for vision models."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    if getattr(config, "model_type", "") == "vit":
        return {"pixel_values": torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=gen)}
    ids = torch.randint(2, config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hidden_share(model, spec) -> float:
    """Share of hidden channels permuted: output units of every Linear and Conv1D layer (Conv1D keeps its
    weight as [in, out]) except those whose outputs are the vocabulary or the classes."""
    outputs = {getattr(model.config, "vocab_size", None), getattr(model.config, "num_labels", None)} - {None}
    state_names = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}  # the spec's names
    hidden = permuted = 0
    for name, module in model.named_modules():
        kind = type(module).__name__
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and kind != "Conv1D":
            continue
        axis = 1 if kind == "Conv1D" else 0
        n = module.weight.shape[axis]
        if n in outputs and name.rsplit(".", 1)[-1] in ("lm_head", "decoder", "classifier", "vocab_projector", "score"):
            continue
        hidden += n
        permuted += n if spec.axes_to_perm[state_names[id(module.weight)]][axis] is not None else 0
    return permuted / hidden
