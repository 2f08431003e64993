"""Multi-head attention, construct by construct, on small library models: a random permutation of the residual
stream, the heads, the dimensions within each head and the feed-forward units keeps the outputs (float64, 1e-8),
a planted permutation (heads included) is recovered exactly by weight matching, every attention layer's heads
are permuted, and every hidden channel is."""

import pytest
import timm
import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

from tests.test_matching_constructs import _check


def _head_perms(spec, key, heads):
    """The head permutation of an attention projection ``key`` (its rows: q, k, v segments or one of them)."""
    rows = spec.axes_to_perm[key][0]
    parts = [p for p, _ in spec.perms[rows]["segments"]] if "segments" in spec.perms.get(rows, {}) else [rows]
    assert all(spec.perms[p]["groups"] == heads for p in parts), (key, parts)
    group_perms = {spec.perms[p]["group_perm"] for p in parts}
    assert len(group_perms) == 1 and None not in group_perms, (key, group_perms)
    if len(parts) == 3:  # queries and keys share their within-head permutation, values have their own
        assert parts[0] == parts[1] != parts[2]
    return group_perms.pop()


def _all_hidden_permuted(model, spec, classifier):
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name != classifier:
            assert spec.axes_to_perm[f"{name}.weight"][0] is not None, name


@pytest.mark.parametrize("fused", [True, False])
def test_timm_vit_qkv_attention(fused):
    """qkv Linear + reshape/permute/unbind + scaled_dot_product_attention (or softmax(q k^T) v), class token and
    position embedding on the residual stream, LayerNorm over the embedding."""
    model = timm.create_model("deit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, img_size=16, patch_size=4,
                              num_classes=5)
    for block in model.blocks:
        block.attn.fused_attn = fused
    spec = _check(model, torch.randn(2, 3, 16, 16), activation=True)
    heads = {_head_perms(spec, f"blocks.{i}.attn.qkv.weight", 4) for i in range(2)}
    assert len(heads) == 2  # one head permutation per layer
    residual = spec.axes_to_perm["patch_embed.proj.weight"][0]
    assert spec.axes_to_perm["cls_token"] == (None, None, residual) == spec.axes_to_perm["pos_embed"]
    assert spec.axes_to_perm["blocks.1.attn.proj.weight"][0] == residual
    _all_hidden_permuted(model, spec, "head")


def test_torchvision_vit_multihead_attention_module():
    """nn.MultiheadAttention (a leaf of the traced graph): packed in_proj [q; k; v], out_proj. Activation matching
    sees no activation of its heads and their dimensions: those are weight-matched given the rest."""
    model = tvm.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48,
                                  num_classes=5)
    spec = _check(model, torch.randn(2, 3, 16, 16), activation=True)
    for i in range(2):
        _head_perms(spec, f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight", 4)
    residual = spec.axes_to_perm["conv_proj.weight"][0]
    assert spec.axes_to_perm["class_token"] == (None, None, residual)
    assert spec.axes_to_perm["encoder.pos_embedding"] == (None, None, residual)
    _all_hidden_permuted(model, spec, "heads.head")


@pytest.mark.parametrize("version", [1, 2])
def test_swin_window_attention_bias_table_follows_heads(version):
    """torchvision's shifted_window_attention (an fx leaf): the relative position bias table [cells, H] (v1) or
    the continuous position bias MLP's output layer (v2) and the logit scale move with their heads."""
    options = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if version == 2 else {}
    model = tvm.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[2, 2],
                                stochastic_depth_prob=0.0, num_classes=5, **options)
    # v2's position bias MLP sees 9 relative coordinates, whatever the data: too few to tell its 512 units apart
    spec = _check(model, torch.randn(2, 3, 16, 16), activation=version == 1)
    for stage, heads in ((1, 2), (3, 4)):
        for block in range(2):
            prefix = f"features.{stage}.{block}.attn"
            head = _head_perms(spec, f"{prefix}.qkv.weight", heads)
            if version == 1:
                assert spec.axes_to_perm[f"{prefix}.relative_position_bias_table"] == (None, head)
            else:
                assert spec.axes_to_perm[f"{prefix}.logit_scale"] == (head, None, None)
                assert spec.axes_to_perm[f"{prefix}.cpb_mlp.2.weight"][0] == head
    _all_hidden_permuted(model, spec, "head")


def test_maxvit_einsum_attention_with_gathered_bias_table():
    """MaxViT: qkv chunked, einsum scores, a bias table gathered by index and permuted to [H, N, N]."""
    model = tvm.MaxVit(input_size=(16, 16), stem_channels=8, partition_size=2, block_channels=[16], block_layers=[1],
                       head_dim=4, stochastic_depth_prob=0.0, num_classes=5)
    spec = _check(model, torch.randn(2, 3, 16, 16), activation=True)
    for layer in ("window_attention", "grid_attention"):
        prefix = f"blocks.0.layers.0.layers.{layer}.attn_layer.1"
        head = _head_perms(spec, f"{prefix}.to_qkv.weight", 4)
        assert spec.axes_to_perm[f"{prefix}.relative_position_bias_table"] == (None, head)
    _all_hidden_permuted(model, spec, "classifier.5")


def test_timm_swin_shifted_windows_and_patch_merging():
    """timm's Swin: torch.roll for the shifted windows, padding that leaves the channels alone, an nn.Softmax
    module over the scores, and patch merging's [.., 2, 2, C] -> [.., 4C] (four copies of the channel's
    permutation)."""
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                              window_size=2, img_size=16, patch_size=2, num_classes=5)
    spec = _check(model, torch.randn(2, 3, 16, 16), activation=True)
    for stage, heads in ((0, 2), (1, 4)):
        _head_perms(spec, f"layers.{stage}.blocks.1.attn.qkv.weight", heads)
    merged = spec.axes_to_perm["layers.1.downsample.reduction.weight"][1]
    stage0 = spec.axes_to_perm["patch_embed.proj.weight"][0]
    assert [p for p, _ in spec.perms[merged]["segments"]] == [stage0] * 4
    _all_hidden_permuted(model, spec, "head.fc")


def test_timm_beit_concatenated_qkv_bias():
    """BEiT: F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias)) with a zero k bias kept out of the state dict;
    the q and v biases take their segments of the projection's rows (layer scales gamma_1/2, relative bias
    table per head)."""
    model = timm.create_model("beit_base_patch16_224", embed_dim=32, depth=2, num_heads=4, img_size=16, patch_size=4,
                              num_classes=5)
    with torch.no_grad():  # timm initialises these to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_()
    spec = _check(model, torch.randn(2, 3, 16, 16), activation=True)
    for i in range(2):
        head = _head_perms(spec, f"blocks.{i}.attn.qkv.weight", 4)
        rows = [p for p, _ in spec.perms[spec.axes_to_perm[f"blocks.{i}.attn.qkv.weight"][0]]["segments"]]
        assert spec.axes_to_perm[f"blocks.{i}.attn.q_bias"] == (rows[0],)
        assert spec.axes_to_perm[f"blocks.{i}.attn.v_bias"] == (rows[2],)
        assert spec.axes_to_perm[f"blocks.{i}.attn.relative_position_bias_table"] == (None, head)
    _all_hidden_permuted(model, spec, "head")
