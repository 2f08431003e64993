"""Hugging Face transformers models built from a checkpoint's own ``config.json`` (architecture ``hf``).

``build(config)`` builds the class that ``architectures`` names (else the AutoModel of its ``model_type``) with
``from_config``: random weights, nothing downloaded (``HF_HUB_OFFLINE=1``), no tokenizer. A config that names
custom code (``auto_map``, ``trust_remote_code``) is refused: the service never runs uploaded code. Two
checkpoints are merged only when their configs agree on every field that shapes the model (``check_configs``).

Other helpers for the rest of the library: ``example_inputs(model)`` (keyword inputs to trace and verify with:
token ids and an attention mask, or pixel values), ``logits(output)`` (a ModelOutput's ``.logits``), and
``tied_groups(model)`` (state-dict names that share one parameter, of which save_pretrained writes one).
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn

from matching.errors import MatchingError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is ever fetched

# Fields of config.json that do not change the function the weights compute (names, ids of special tokens,
# versions, the storage dtype, training-only settings); every other field must agree between the checkpoints.
NON_SHAPING_FIELDS = {
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "initializer_range",
    "initializer_factor", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id",
    "decoder_start_token_id", "mask_token_id", "output_attentions", "output_hidden_states", "return_dict",
    "gradient_checkpointing", "finetuning_task", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "label2id", "id2label", "_attn_implementation_autoset", "attn_implementation", "_attn_implementation",
}  # fmt: skip
DROPOUT_FIELD = re.compile(r"(dropout|_pdrop$|drop_path|dropout_prob|dropout_rate)")
REMOTE_CODE_FIELDS = ("auto_map", "trust_remote_code", "custom_pipelines")
CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,100}")
VISION_INPUT = "pixel_values"


def refuse_remote_code(config: dict, where: str = "config.json") -> None:
    """MatchingError when a config names code outside transformers (at any depth)."""
    for key, value in config.items():
        if key in REMOTE_CODE_FIELDS and value:
            raise MatchingError(f"{where} names custom code ({key!r}): models whose code ships with the checkpoint "
                                "(trust_remote_code) are refused, since the service never runs uploaded code; only "
                                "architectures built into transformers can be merged")
        if isinstance(value, dict):
            refuse_remote_code(value, f"{where} {key}")


def _shaping(config: dict, prefix: str = "") -> dict[str, object]:
    """The fields that shape the model, flattened to dotted names (sub-configs of multimodal models included);
    label maps count only by their size (the head's width)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if key in ("id2label", "label2id") and isinstance(value, dict):
            out.setdefault(f"{prefix}num_labels", len(value))
        if key in NON_SHAPING_FIELDS or DROPOUT_FIELD.search(key):
            continue
        if isinstance(value, dict):
            out.update(_shaping(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_configs(configs: list[dict]) -> None:
    """The configs of the checkpoints to merge: each one builds a transformers model, and all agree on every
    field that shapes it; otherwise MatchingError naming the first field that differs."""
    for i, config in enumerate(configs):
        if not isinstance(config, dict):
            raise MatchingError(f"checkpoint {i}: config.json must be a JSON object")
        refuse_remote_code(config, f"checkpoint {i}'s config.json")
    first = _shaping(configs[0])
    for i, config in enumerate(configs[1:], 1):
        other = _shaping(config)
        for key in sorted(set(first) | set(other)):
            if first.get(key, "(absent)") != other.get(key, "(absent)"):
                raise MatchingError(
                    f"the checkpoints' configs differ in {key!r}: {json.dumps(first.get(key, '(absent)'))} in checkpoint 0, "
                    f"{json.dumps(other.get(key, '(absent)'))} in checkpoint {i}; models of different shapes cannot be merged")


def _model_class(config: dict, hf_config):
    import transformers

    for name in config.get("architectures") or []:
        if not isinstance(name, str) or not CLASS_NAME.fullmatch(name):
            raise MatchingError(f"config.json: architectures names {str(name)[:100]!r}, which is not a class name")
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            if cls.config_class is not None and not isinstance(hf_config, cls.config_class):
                raise MatchingError(f"config.json: class {name} does not take a {config.get('model_type')!r} config")
            return cls
        raise MatchingError(f"config.json: architectures names {name!r}, which transformers "
                            f"{transformers.__version__} does not have")
    return transformers.AutoModel


def build(config: dict) -> nn.Module:
    """The model ``config`` (a parsed config.json) describes, with random weights, in float32, in eval mode."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(config, dict):
        raise MatchingError("hf option 'config' must be the checkpoint's config.json (a JSON object)")
    refuse_remote_code(config)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise MatchingError(f"config.json: model_type {model_type!r} is not one transformers "
                            f"{transformers.__version__} knows")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "dtype", "torch_dtype", "transformers_version")}
    try:
        hf_config = CONFIG_MAPPING[model_type](**fields)
        hf_config.use_cache = False  # no key/value cache: a plain function of its inputs (tracing, evaluation)
        cls = _model_class(config, hf_config)
        model = cls.from_config(hf_config) if cls is transformers.AutoModel else cls._from_config(hf_config)
    except MatchingError:
        raise
    except Exception as error:  # transformers' own checks of the config
        raise MatchingError(f"config.json does not build a {model_type} model: "
                            f"{(str(error).strip().splitlines() or [type(error).__name__])[0][:300]}") from None
    _save_under_checkpoint_names(model)
    return model.float().eval()


def _save_under_checkpoint_names(model: nn.Module) -> None:
    """transformers 5 renames some models' tensors between the file and the module (ViT's
    ``vit.encoder.layer.0.attention.attention.query`` is ``vit.layers.0.attention.q_proj``) and back on save: the
    model's state dict takes and gives the file's names, so checkpoints, specs and outputs all use them. Only pure
    renamings are followed; a conversion that changes tensors (fused experts) leaves the names as they are."""
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict()  # one tensor object per name, tied weights included
    saved = revert_weight_conversion(model, dict(state))
    own = {id(t): name for name, t in state.items()}
    if len(saved) != len(state) or any(id(t) not in own for t in saved.values()):
        return
    to_file = {own[id(t)]: name for name, t in saved.items() if own[id(t)] != name}
    if not to_file:
        return
    to_module = {file: module for module, file in to_file.items()}

    def renamed(state_dict, names):
        for old in [k for k in state_dict if k in names]:
            state_dict[names[old]] = state_dict.pop(old)

    model.register_state_dict_post_hook(lambda module, state_dict, prefix, metadata: renamed(state_dict, to_file))
    model.register_load_state_dict_pre_hook(lambda module, state_dict, prefix, *rest: renamed(state_dict, to_module))


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that share one parameter (tied input/output embeddings), two or more a group:
    save_pretrained writes one of each group, and loading sets them all from it."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def is_vision(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", "input_ids") == VISION_INPUT


def example_inputs(model: nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``model(**inputs)``: ``input_ids`` and an ``attention_mask`` (the last example's last
    positions masked, so that a spec verified on them holds with padding) for text models, ``pixel_values`` for
    vision models. Deterministic."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    if is_vision(model):
        side = getattr(config, "image_size", 32)
        side = side[0] if isinstance(side, (list, tuple)) else side
        channels = getattr(config, "num_channels", 3)
        return {VISION_INPUT: torch.randn(batch, channels, side, side, generator=generator)}
    vocab = getattr(config, "vocab_size", None) or 64
    length = min(8, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 8)
    ids = torch.randint(vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def check_input_shape(model: nn.Module, example_shape: tuple[int, ...]) -> None:
    """Whether the model takes dataset inputs of this per-example shape: token ids [T] up to its longest sequence,
    or images [C, H, W] with its channels. (Checked from its config: transformers models do not run on the meta
    device, and running them for real at submission would cost what the job costs.)"""
    config = model.config
    if is_vision(model):
        channels = getattr(config, "num_channels", 3)
        if len(example_shape) != 3 or example_shape[0] != channels:
            raise MatchingError(f"dataset inputs have per-example shape {list(example_shape)}, but this "
                                f"{config.model_type} model takes images [{channels}, H, W] (pixel_values)")
        return
    longest = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                    if isinstance(getattr(config, k, None), int)), None)
    if len(example_shape) != 1 or (longest is not None and example_shape[0] > longest):
        raise MatchingError(f"dataset inputs have per-example shape {list(example_shape)}, but this {config.model_type} "
                            f"model takes token ids [T]" + (f" with T <= {longest}" if longest else ""))


def logits(output) -> torch.Tensor:
    """The logits of a model's output: a tensor as it is, a ModelOutput's ``.logits`` (else its first field:
    a base model's ``last_hidden_state``)."""
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, "logits", None)
    if value is None:
        if hasattr(output, "to_tuple"):
            value = output.to_tuple()[0]
        elif isinstance(output, dict):
            value = next(iter(output.values()), None)
        elif isinstance(output, (tuple, list)) and output:
            value = output[0]
    if not isinstance(value, torch.Tensor):
        raise MatchingError(f"the model's output ({type(output).__name__}) holds no logits")
    return value
