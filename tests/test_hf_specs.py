"""Hugging Face transformers (tiny configs built here, nothing downloaded): torch.fx cannot trace them, so their
graphs are captured with torch.export. For each of GPT-2, BERT, RoBERTa, DistilBERT, LLaMA, Mistral, Qwen2 and
ViT: the inferred spec is verified on keyword inputs (token ids with a padding mask; pixel values), permutes at
least 95% of the hidden channels (residual stream, MLP, heads), and a planted permutation, heads included, is
recovered exactly by weight matching."""

import pytest
import torch

import matching
from matching.activation_matching import activation_matching
from matching.spec import apply_permutation, invert, perm_sizes, random_perms, spec_from_json, spec_to_json
from tests.hf_models import example, hidden_share, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KINDS = ["gpt2", "bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "vit"]


def _planted(spec, state, seed=1):
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state.items()})
    planted = random_perms(sizes, torch.Generator().manual_seed(seed), spec)
    return planted, apply_permutation(spec, planted, state)


@pytest.mark.parametrize("kind", KINDS + ["gpt_neox"])
def test_verified_spec_recovers_a_planted_permutation(kind):
    model = tiny(kind)
    spec = spec_from_json(spec_to_json(matching.infer_spec(model, example(model))))  # verified inside
    assert hidden_share(model, spec) >= 0.95
    state = model.state_dict()
    planted, permuted = _planted(spec, state)
    assert any(spec.perms.get(p, {}).get("groups") for p in spec.perms)  # heads are in the spec
    perms, _ = matching.weight_matching(spec, state, permuted, seed=0)
    for name, p in planted.items():
        assert torch.equal(perms[name], invert(p)), name
    aligned = tiny(kind)  # B aligned back is A: same outputs
    aligned.load_state_dict(apply_permutation(spec, perms, permuted))
    with torch.no_grad():
        assert torch.allclose(aligned(**example(model)).logits, model(**example(model)).logits, atol=1e-5)


def test_gpt2_layout_fused_qkv_and_tied_head():
    model = tiny("gpt2")
    spec = matching.infer_spec(model, example(model))
    axes = spec.axes_to_perm
    residual = axes["transformer.wte.weight"][1]
    assert residual is not None and axes["lm_head.weight"] == (None, residual)  # tied: one labelling
    assert axes["transformer.wpe.weight"] == (None, residual)
    qkv = axes["transformer.h.0.attn.c_attn.weight"]  # Conv1D: [in, out]
    assert qkv[0] == residual and [s for s, _ in spec.perms[qkv[1]]["segments"]][0] is not None
    q, k, v = (s for s, _ in spec.perms[qkv[1]]["segments"])
    assert q == k != v and spec.perms[q]["group_perm"] == spec.perms[v]["group_perm"] is not None
    assert axes["transformer.h.0.attn.c_proj.weight"] == (v, residual)
    assert axes["transformer.h.1.mlp.c_proj.weight"][1] == residual


def test_bert_post_norm_stream_and_tied_mlm_head():
    model = tiny("bert")
    spec = matching.infer_spec(model, example(model))
    axes = spec.axes_to_perm
    residual = axes["bert.embeddings.word_embeddings.weight"][1]
    for key in ("bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight",
                "cls.predictions.decoder.weight"):
        assert axes[key] == (None, residual), key
    assert axes["bert.encoder.layer.1.output.LayerNorm.weight"] == (residual,)
    # the MLM head's transform feeds the decoder tied to the word embeddings: its units are the stream's
    assert axes["cls.predictions.transform.dense.weight"] == (residual, residual)


def test_llama_rotary_heads_move_whole_and_query_heads_stay_in_their_group():
    model = tiny("llama")
    spec = spec_from_json(spec_to_json(matching.infer_spec(model, example(model))))
    perms, axes = spec.perms, spec.axes_to_perm
    q, k, v = (axes[f"model.layers.0.self_attn.{n}_proj.weight"][0] for n in "qkv")
    assert perms[q]["per_unit"] == perms[k]["per_unit"] == 8  # within-head dimensions in place (rotary)
    query_heads, kv_heads = perms[q]["expand"], perms[k]["expand"]
    assert perms[query_heads] == {"groups": 2, "group_perm": kv_heads}  # 4 query heads in 2 key/value groups
    assert perms[v]["expand"] == kv_heads
    assert any("rotary" in note for note in spec.left_out) and any("grouped-query" in note for note in spec.left_out)
    sizes = perm_sizes(spec, {key: tuple(t.shape) for key, t in model.state_dict().items()})
    assert sizes[query_heads] == 4 and sizes[kv_heads] == 2


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_activation_matching_recovers_a_planted_permutation(kind):
    """Activations from the exported graph (token ids only, batches of another size than the example's)."""
    model = tiny(kind)
    spec = matching.infer_spec(model, example(model)["input_ids"])
    state = model.state_dict()
    planted, permuted = _planted(spec, state)
    tokens = torch.randint(0, model.config.vocab_size, (48, 8), generator=torch.Generator().manual_seed(3))
    perms, _ = activation_matching(spec, model, state, permuted, tokens, batch_size=20)
    for name, p in planted.items():
        assert torch.equal(perms[name], invert(p)), name


def test_model_neither_capture_handles_is_refused_without_sending_to_spec_module():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(matching.MatchingError) as error:
        matching.infer_spec(DataDependent(), torch.randn(2, 4))
    message = str(error.value)
    assert "torch.fx" in message and "torch.export" in message and "if x.sum() > 0" in message
    assert "write the spec by hand" in message and "fails the same way" in message


def tiny_gpt2():
    """A factory for ``rebasin spec --module tests.test_hf_specs:tiny_gpt2``."""
    return tiny("gpt2")


def test_spec_module_builds_token_inputs_for_a_language_model():
    from matching.cli import export_spec

    spec = spec_from_json(export_spec(module="tests.test_hf_specs:tiny_gpt2"))  # no --input-shape: ids + mask
    assert spec.axes_to_perm["transformer.h.0.mlp.c_fc.weight"][1] is not None
    spec = spec_from_json(export_spec(module="tests.test_hf_specs:tiny_gpt2", input_shape="5"))  # [T]
    assert spec.axes_to_perm["transformer.h.0.mlp.c_fc.weight"][1] is not None
    with pytest.raises(matching.MatchingError, match="token ids"):
        export_spec(module="tests.test_hf_specs:tiny_gpt2", input_shape="3,8,8")


@pytest.mark.parametrize("kind,least", [("bloom", 1.0), ("persimmon", 1.0), ("roformer", 1.0), ("deberta-v2", 1.0),
                                        ("mpnet", 1.0), ("xglm", 0.69)])
def test_attention_variants_keep_their_heads_movable(kind, least):
    """Heads merged into the batch axis with baddbmm / bmm scores (Bloom, XGLM, DeBERTa-v2), a layer norm over
    each head (Persimmon), rotary by sinusoidal tables reshaped like the heads (RoFormer), an in-place position
    bias (MPNet). XGLM's residual stream stays in place: its sinusoidal positions are not in the state dict."""
    from benchmarks.hf_models import build
    from benchmarks.hf_models import example as bench_example
    from benchmarks.hf_models import hidden_share as bench_share

    model, kind_of_input = build(kind)
    spec = matching.infer_spec(model, bench_example(model, kind_of_input))  # verified
    permuted, hidden = bench_share(model, spec)
    assert permuted / hidden >= least - 1e-3
