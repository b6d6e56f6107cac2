"""Model fidelity: variants, zero init, checkpoint layouts (CogVideoX 1.0/1.5 bases, official DynamiCtrl),
and equivalence with an independent re-derivation of the published forward pass."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from dynamictrl.models import DynamiCtrlTransformer3DModel
from dynamictrl.models.inspect import part_counts, table

V15 = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=32,
           ofs_embed_dim=32, text_embed_dim=24, num_layers=2, sample_width=8, sample_height=12, sample_frames=9,
           patch_size=2, patch_size_t=2, max_text_seq_length=8, use_rotary_positional_embeddings=True,
           patch_bias=False)  # fmt: skip
# CogVideoX-5B-I2V (1.0) layout: no temporal patch, no ofs, learned positional embeddings.
V10 = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=32,
           text_embed_dim=24, num_layers=2, sample_width=8, sample_height=12, sample_frames=9, patch_size=2,
           max_text_seq_length=8, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)  # fmt: skip


def inputs(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = 4 if arch.get("patch_size_t") else 3
    kw = dict(hidden_states=torch.randn(2, frames, 32, 12, 8, generator=g),
              encoder_hidden_states=torch.randn(2, 8, 24, generator=g), timestep=torch.tensor([10, 900]))  # fmt: skip
    if arch.get("ofs_embed_dim"):
        kw["ofs"] = torch.tensor([2.0])
    if arch.get("patch_size_t"):
        kw["image_rotary_emb"] = get_3d_rotary_pos_embed(16, None, (6, 4), 2, grid_type="slice", max_size=(6, 4))
    else:
        kw["image_rotary_emb"] = get_3d_rotary_pos_embed(16, ((0, 0), (6, 4)), (6, 4), frames)
    return kw, torch.randn(2, frames, 16, 12, 8, generator=g)


def save_base(arch, folder, seed=0):
    torch.manual_seed(seed)
    base = CogVideoXTransformer3DModel(**arch).eval()
    base.save_pretrained(folder)
    return base


@pytest.mark.parametrize("arch", [V10, V15], ids=["1.0", "1.5"])
@pytest.mark.parametrize("control", ["padaln", "uvt", "cross_attn"])
def test_base_checkpoint_loads_with_only_the_pose_branch_missing_and_zero_init_equals_base(arch, control, tmp_path):
    base = save_base(arch, tmp_path)
    model, info = DynamiCtrlTransformer3DModel.from_pretrained(tmp_path, control=control, pose_init="zero",
                                                               output_loading_info=True)  # fmt: skip
    new = tuple(model.new_modules())
    assert info["missing_keys"], "a base checkpoint lacks the pose branch"
    assert all(k.startswith(new) or k == "patch_embed.proj.weight[pose channels]" for k in info["missing_keys"])
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    kw, pose = inputs(arch)
    with torch.no_grad():
        ours = model.eval()(**kw, control_hidden_states=pose).sample
        ref = base(**kw).sample
    assert (ours - ref).abs().max() < 1e-5
    if control == "uvt":  # the pretrained patch embedding fills the first channels of the widened one
        w = model.patch_embed.proj.weight
        b = base.patch_embed.proj.weight
        assert torch.equal(w[:, : b.shape[1]], b) and w[:, b.shape[1] :].abs().sum() == 0


@pytest.mark.parametrize("control", ["padaln", "cross_attn"])
def test_official_init_gives_the_pose_branch_pytorch_defaults(control, tmp_path):
    save_base(V15, tmp_path)
    model = DynamiCtrlTransformer3DModel.from_pretrained(tmp_path, control=control, pose_init="official")
    branch = list(model.new_modules().values())[0]
    weights = [p for n, p in branch.named_parameters() if n.endswith("weight") and p.dim() == 2]
    assert all(p.abs().sum() > 0 and p.std() < 1.0 for p in weights)  # random, kaiming-scaled
    kw, pose = inputs(V15)
    with torch.no_grad():
        assert (model(**kw, control_hidden_states=pose).sample - model(**kw).sample).abs().max() > 1e-4


def test_released_dynamictrl_layout_loads_with_no_missing_or_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    ours = DynamiCtrlTransformer3DModel(**V15).eval()
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["_class_name"] = "DynamiCtrlTransformerModel"  # the official class name; no control/pose_init keys
    for key in ("control", "pose_init"):
        cfg.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded, info = DynamiCtrlTransformer3DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    kw, pose = inputs(V15)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**kw, control_hidden_states=pose).sample,
                                   ours(**kw, control_hidden_states=pose).sample, rtol=0, atol=1e-6)  # fmt: skip


def reference_forward(m, hidden_states, encoder_hidden_states, timestep, ofs, image_rotary_emb, pose):
    """The published DynamiCtrl forward, written out from its description (paper eqs. 2-4 and the
    released model): pose doubled on channels through the shared patch embedding with the text,
    text positions dropped; per block, PadaLN(pose) added to norm1's video output, the pose stream
    handed on as y + gate * y. Uses the model's weights but none of its forward code."""
    emb = m.time_embedding(m.time_proj(timestep)) + m.ofs_embedding(m.ofs_proj(ofs))
    L = encoder_hidden_states.shape[1]
    tokens = m.patch_embed(encoder_hidden_states, hidden_states)
    text, video = tokens[:, :L], tokens[:, L:]
    c = m.patch_embed(encoder_hidden_states, torch.cat([pose, pose], dim=2))[:, L:]
    for blk in m.transformer_blocks:
        mod = blk.norm1.linear(F.silu(emb)).chunk(6, dim=1)
        shift, scale, gate, e_shift, e_scale, e_gate = (x[:, None] for x in mod)
        nv = blk.norm1.norm(video) * (1 + scale) + shift
        nt = blk.norm1.norm(text) * (1 + e_scale) + e_shift
        p_shift, p_scale, p_gate = blk.control_norm1.linear(F.silu(emb)).chunk(3, dim=1)
        y = blk.control_norm1.norm(c) * (1 + p_scale[:, None]) + p_shift[:, None]
        nv = nv + y
        c = y + p_gate[:, None] * y
        av, at = blk.attn1(hidden_states=nv, encoder_hidden_states=nt, image_rotary_emb=image_rotary_emb)
        video, text = video + gate * av, text + e_gate * at
        mod = blk.norm2.linear(F.silu(emb)).chunk(6, dim=1)
        shift, scale, gate, e_shift, e_scale, e_gate = (x[:, None] for x in mod)
        ff = blk.ff(torch.cat([blk.norm2.norm(text) * (1 + e_scale) + e_shift,
                               blk.norm2.norm(video) * (1 + scale) + shift], dim=1))  # fmt: skip
        text, video = text + e_gate * ff[:, :L], video + gate * ff[:, L:]
    out = m.proj_out(m.norm_out(m.norm_final(video), temb=emb))
    b, f, _, h, w = hidden_states.shape
    out = out.reshape(b, f // 2, h // 2, w // 2, -1, 2, 2, 2)
    return out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)


def test_forward_equals_the_published_algorithm():
    torch.manual_seed(0)
    m = DynamiCtrlTransformer3DModel(**V15).eval()
    kw, pose = inputs(V15)
    with torch.no_grad():
        ours = m(**kw, control_hidden_states=pose).sample
        ref = reference_forward(m, kw["hidden_states"], kw["encoder_hidden_states"], kw["timestep"], kw["ofs"],
                                kw["image_rotary_emb"], pose)  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("control", ["uvt", "cross_attn"])
def test_variants_run_and_use_the_pose(control):
    torch.manual_seed(0)
    m = DynamiCtrlTransformer3DModel(**V15, control=control).eval()
    kw, pose = inputs(V15)
    with torch.no_grad():
        a = m(**kw, control_hidden_states=pose).sample
        b = m(**kw, control_hidden_states=pose.flip(0)).sample
    assert a.shape == (2, 4, 16, 12, 8)
    if control == "cross_attn":  # default init: the pose acts from step 0
        assert (a - b).abs().max() > 1e-4
    else:  # UVT's pose columns start at zero: the pose acts once training moves them
        assert (a - b).abs().max() == 0


def test_padaln_overhead_is_at_most_4_percent_at_5b_and_cross_attention_is_far_larger():
    from dynamictrl import config

    arch = dict(config.load("train", ["model=cogvideox1.5-5b-i2v", "data.train_shards=x"]).model.transformer)
    rows = {r["control"]: r for r in table("cogvideox1.5-5b-i2v", arch)}
    assert 5.5e9 < rows["padaln"]["base"] < 5.65e9
    assert rows["padaln"]["overhead"] <= 0.04
    assert rows["cross_attn"]["overhead"] > 0.3


def test_part_counts_add_up():
    m = DynamiCtrlTransformer3DModel(**V15, control="uvt")
    assert sum(part_counts(m).values()) == sum(p.numel() for p in m.parameters())
