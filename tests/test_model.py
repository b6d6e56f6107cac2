"""The DynamiCtrl transformer: shapes, PadaLN wiring, zero init, save/load, errors."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from dynamictrl.models import DynamiCtrlTransformer3DModel

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=32,
            ofs_embed_dim=32, text_embed_dim=24, num_layers=2, sample_width=8, sample_height=12, sample_frames=9,
            patch_size=2, patch_size_t=2, max_text_seq_length=8, use_rotary_positional_embeddings=True,
            patch_bias=False)  # fmt: skip


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 32, 12, 8, generator=g)
    text = torch.randn(2, 8, 24, generator=g)
    pose = torch.randn(2, 4, 16, 12, 8, generator=g)
    rope = get_3d_rotary_pos_embed(16, None, (6, 4), 2, grid_type="slice", max_size=(6, 4))
    return dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([10, 900]),
                ofs=torch.tensor([2.0]), image_rotary_emb=rope), pose  # fmt: skip


def test_forward_shape_and_the_pose_changes_the_output():
    torch.manual_seed(0)
    model = DynamiCtrlTransformer3DModel(**TINY).eval()
    kw, pose = inputs()
    with torch.no_grad():
        out = model(**kw, control_hidden_states=pose).sample
        other = model(**kw, control_hidden_states=pose.flip(0)).sample
        base = model(**kw).sample
    assert out.shape == (2, 4, 16, 12, 8)
    assert (out - other).abs().max() > 1e-3  # the pose reaches the output
    assert (out - base).abs().max() > 1e-3


def test_weights_use_the_official_names():
    names = DynamiCtrlTransformer3DModel(**TINY).state_dict().keys()
    for n in range(2):
        for part in ("linear.weight", "linear.bias", "norm.weight", "norm.bias"):
            assert f"transformer_blocks.{n}.control_norm1.{part}" in names


def test_zero_init_computes_exactly_the_base_cogvideox():
    torch.manual_seed(0)
    model = DynamiCtrlTransformer3DModel(**TINY, pose_init="zero").eval()
    base = CogVideoXTransformer3DModel(**TINY).eval()
    missing, unexpected = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("control_norm1" in k for k in unexpected)
    kw, pose = inputs()
    with torch.no_grad():
        diff = (model(**kw, control_hidden_states=pose).sample - base(**kw).sample).abs().max()
    assert diff < 1e-5


def test_pose_stream_is_handed_to_the_next_block():
    """Block 1's PadaLN must see y + gate * y of block 0, with y = LN(c)(1 + scale) + shift computed
    from block 0's own weights on the patch-embedded pose c; neither the raw pose nor y alone."""
    torch.manual_seed(0)
    model = DynamiCtrlTransformer3DModel(**TINY).eval()
    kw, pose = inputs()
    seen = {}
    hooks = [model.transformer_blocks[i].control_norm1.register_forward_pre_hook(
        lambda m, args, i=i: seen.__setitem__(i, args[0].clone())) for i in range(2)]  # fmt: skip
    with torch.no_grad():
        model(**kw, control_hidden_states=pose)
        for h in hooks:
            h.remove()
        temb = model.time_embedding(model.time_proj(kw["timestep"])) + model.ofs_embedding(model.ofs_proj(kw["ofs"]))
        c = seen[0]  # the pose tokens block 0 received
        pose_tokens = model.patch_embed(kw["encoder_hidden_states"], torch.cat([pose, pose], dim=2))[:, 8:]
        torch.testing.assert_close(c, pose_tokens)
        cn = model.transformer_blocks[0].control_norm1
        shift, scale, gate = cn.linear(torch.nn.functional.silu(temb)).chunk(3, dim=1)
        y = cn.norm(c) * (1 + scale[:, None]) + shift[:, None]
        expected = y + gate[:, None] * y
    torch.testing.assert_close(seen[1], expected, rtol=1e-5, atol=1e-5)
    assert (seen[1] - c).abs().max() > 1e-2 and (seen[1] - y).abs().max() > 1e-2  # the test tells them apart


def test_changing_block_0s_gate_changes_the_output_through_block_1():
    """Block 0's gate acts only on the stream it hands on: changing it alone changes the output, and
    does so only while block 1's PadaLN reads that stream."""
    torch.manual_seed(0)
    model = DynamiCtrlTransformer3DModel(**TINY).eval()
    kw, pose = inputs()
    dim = model.transformer_blocks[0].control_norm1.norm.normalized_shape[0]
    with torch.no_grad():
        before = model(**kw, control_hidden_states=pose).sample
        model.transformer_blocks[0].control_norm1.linear.bias[2 * dim :].add_(0.5)  # the gate third only
        after = model(**kw, control_hidden_states=pose).sample
        block1 = model.transformer_blocks[1].control_norm1
        for p in (block1.linear.weight, block1.linear.bias, block1.norm.weight, block1.norm.bias):
            p.zero_()  # block 1 no longer reads the stream
        deaf = model(**kw, control_hidden_states=pose).sample
        model.transformer_blocks[0].control_norm1.linear.bias[2 * dim :].sub_(0.5)
        deaf_before = model(**kw, control_hidden_states=pose).sample
    assert (before - after).abs().max() > 1e-4
    torch.testing.assert_close(deaf, deaf_before, rtol=0, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DynamiCtrlTransformer3DModel(**TINY).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DynamiCtrlTransformer3DModel.from_pretrained(tmp_path).eval()
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    kw, pose = inputs()
    with torch.no_grad():
        a, b = model(**kw, control_hidden_states=pose).sample, loaded(**kw, control_hidden_states=pose).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_shapes_get_clear_errors():
    model = DynamiCtrlTransformer3DModel(**TINY)
    kw, pose = inputs()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(**(kw | {"hidden_states": torch.randn(2, 4, 32, 11, 8)}))
    with pytest.raises(ValueError, match="control_hidden_states has shape"):
        model(**kw, control_hidden_states=pose[:, :2])
    with pytest.raises(ValueError, match="choose one of"):
        DynamiCtrlTransformer3DModel(**TINY, control="nonsense")
