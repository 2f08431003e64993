"""Tiny Hugging Face transformers for the coverage benchmark: each model type's default config, shrunk in code
(two layers, width 64, four heads, two key/value heads, a vocabulary of 99, 11 classes); nothing downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, CLASSES = 99, 11
CAUSAL = ("gpt2", "gpt_neo", "gpt_neox", "gptj", "codegen", "gpt_bigcode", "opt", "bloom", "falcon", "mpt", "biogpt",
          "xglm", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "stablelm", "starcoder2",
          "olmo", "olmo2", "cohere", "granite", "helium", "glm", "smollm3", "persimmon", "mixtral", "qwen2_moe")
MASKED = ("bert", "roberta", "distilbert", "albert", "electra", "camembert", "xlm-roberta", "mpnet", "roformer",
          "megatron-bert", "data2vec-text", "ernie", "modernbert", "deberta-v2")
VISION = ("vit", "deit", "beit", "dinov2", "swin", "convnext", "resnet", "mobilevit")
TYPES = CAUSAL + MASKED + VISION

_SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
          "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 16, "embedding_size": 64,
          "moe_intermediate_size": 48, "shared_expert_intermediate_size": 48, "num_experts": 4, "num_local_experts": 4,
          "num_experts_per_tok": 2, "ffn_dim": 96, "word_embed_proj_dim": 64, "multi_query": False,
          "n_inner": 96, "d_ff": 96, "hidden_dim": 96, "dim": 64, "n_layers": 2, "n_heads": 4,
          "image_size": 32, "patch_size": 8, "num_channels": 3, "global_attn_every_n_layers": 1,
          "first_k_dense_replace": 0, "rotary_dim": 8}


def build(model_type: str):
    """The model of ``model_type`` (AutoModelFor{CausalLM, MaskedLM, ImageClassification}) at a tiny size."""
    import torch
    import transformers as tf

    tf.logging.set_verbosity_error()
    config = tf.AutoConfig.for_model(model_type)
    for name, value in _SIZES.items():
        if hasattr(config, name) or name in getattr(config, "attribute_map", {}):
            try:
                setattr(config, name, value)
            except (AttributeError, ValueError):
                pass
    if hasattr(config, "vocab_size"):
        config.vocab_size = VOCAB
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, min(getattr(config, name), 2))
    if model_type in ("swin", "convnext", "resnet", "mobilevit"):  # stages: two, narrow
        for name, value in (("depths", [1, 1]), ("hidden_sizes", [16, 32]), ("embed_dim", 16), ("num_heads", [2, 4]),
                            ("window_size", 4), ("embedding_size", 16), ("neck_hidden_sizes", [8, 8, 16, 16, 24, 32, 64])):
            if hasattr(config, name):
                setattr(config, name, value)
        if model_type == "swin":  # 8 x 8 patches, 4 x 4 in the second stage: whole windows of 4 (fewer do not run)
            config.patch_size = 4
        if model_type == "convnext":
            config.num_stages = 2
        if model_type == "mobilevit":
            config.hidden_sizes = [32, 48, 64]
    config.num_labels = CLASSES
    if getattr(config, "architectures", None) is None:  # DeiT's auto class (a tuple of two) iterates over it
        config.architectures = []
    kind = "vision" if model_type in VISION else "masked" if model_type in MASKED else "causal"
    auto = {"vision": tf.AutoModelForImageClassification, "masked": tf.AutoModelForMaskedLM,
            "causal": tf.AutoModelForCausalLM}[kind]
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    with torch.no_grad():  # norms off their 1 / 0 init: a spec that forgets them fails verification
        for tensor in model.parameters():
            if tensor.dim() == 1:
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return model, kind


def example(model, kind: str) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    if kind == "vision":
        size = getattr(model.config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(2, model.config.num_channels, size, size, generator=gen)}
    ids = torch.randint(3, VOCAB, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hidden_share(model, spec) -> tuple[int, int]:
    """(permuted, hidden) output units of every Linear, Conv1D ([in, out] weight) and Conv2d layer, except the
    ones that produce the vocabulary or the classes."""
    import torch

    hidden = permuted = 0
    for name, module in model.named_modules():
        kind = type(module).__name__
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and kind != "Conv1D":
            continue
        axis = 1 if kind == "Conv1D" else 0
        n = module.weight.shape[axis]
        if n in (VOCAB, CLASSES):
            continue
        hidden += n
        permuted += n if spec.axes_to_perm.get(f"{name}.weight", (None, None))[axis] is not None else 0
    return permuted, hidden
