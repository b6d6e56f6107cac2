"""Tiny random-weight SAM 2 and SAM 1 models, saved the way the released ones are, for tests and
benchmarks of `dynamictrl.preprocess.masks` (DESIGN.md §3: no weights can be downloaded here).

    SAM 2: a yaml in sam2's own config format (`# @package _global_`, a `model:` node of `_target_`s,
           like `sam2/configs/sam2.1/sam2.1_hiera_t.yaml`) and a `{"model": state_dict}` checkpoint,
           as `sam2.1_hiera_*.pt` are stored.
    SAM 1: a plain state dict, as `sam_vit_h_4b8939.pth` is stored, and a yaml describing the
           `segment_anything.modeling.Sam` module (the registry only knows the full-size ViT-B/L/H).

Both are loaded through exactly the code real weights take: build the architecture from the config,
then load the state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

SAM2_HEADER = "# @package _global_\n# Tiny random-weight SAM 2.1-style model (dynamictrl.testing).\n"
SAM1_HEADER = "# Tiny random-weight SAM 1 (dynamictrl.testing).\n"


def sam2_config(image_size: int = 128, embed_dim: int = 16, d_model: int = 32, mem_dim: int = 16) -> dict:
    """sam2.1_hiera_t.yaml shrunk: Hiera stages of 1, 1, 2, 1 blocks from `embed_dim` channels (the global-
    attention block must be a stage's second: first blocks pool), FPN neck and SAM heads of `d_model`
    channels, one memory-attention layer, `mem_dim`-channel memories. The flags after the modules are
    Hiera-T's, so the same code paths run."""
    stride16 = image_size // 16  # the memory attention's RoPE grid: stride-16 features
    rope = {"_target_": "sam2.modeling.sam.transformer.RoPEAttention", "rope_theta": 10000.0,
            "feat_sizes": [stride16, stride16], "embedding_dim": d_model, "num_heads": 1,
            "downsample_rate": 1, "dropout": 0.1}  # fmt: skip
    sine = "sam2.modeling.position_encoding.PositionEmbeddingSine"
    model = {
        "_target_": "sam2.modeling.sam2_base.SAM2Base",
        "image_encoder": {
            "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder",
            "scalp": 1,
            "trunk": {"_target_": "sam2.modeling.backbones.hieradet.Hiera", "embed_dim": embed_dim,
                      "num_heads": 1, "stages": [1, 1, 2, 1], "global_att_blocks": [3],
                      "window_spec": [8, 4, 8, 4], "window_pos_embed_bkg_spatial_size": [4, 4]},
            "neck": {"_target_": "sam2.modeling.backbones.image_encoder.FpnNeck",
                     "position_encoding": {"_target_": sine, "num_pos_feats": d_model, "normalize": True,
                                           "scale": None, "temperature": 10000},
                     "d_model": d_model,
                     "backbone_channel_list": [embed_dim * 8, embed_dim * 4, embed_dim * 2, embed_dim],
                     "fpn_top_down_levels": [2, 3], "fpn_interp_model": "nearest"},
        },  # fmt: skip
        "memory_attention": {
            "_target_": "sam2.modeling.memory_attention.MemoryAttention", "d_model": d_model,
            "pos_enc_at_input": True, "num_layers": 1,
            "layer": {"_target_": "sam2.modeling.memory_attention.MemoryAttentionLayer", "activation": "relu",
                      "dim_feedforward": 2 * d_model, "dropout": 0.1, "pos_enc_at_attn": False,
                      "d_model": d_model, "pos_enc_at_cross_attn_keys": True,
                      "pos_enc_at_cross_attn_queries": False, "self_attention": rope,
                      "cross_attention": {**rope, "rope_k_repeat": True, "kv_in_dim": mem_dim}},
        },  # fmt: skip
        "memory_encoder": {
            "_target_": "sam2.modeling.memory_encoder.MemoryEncoder", "out_dim": mem_dim, "in_dim": d_model,
            "position_encoding": {"_target_": sine, "num_pos_feats": mem_dim, "normalize": True,
                                  "scale": None, "temperature": 10000},
            "mask_downsampler": {"_target_": "sam2.modeling.memory_encoder.MaskDownSampler",
                                 "embed_dim": d_model, "kernel_size": 3, "stride": 2, "padding": 1},
            "fuser": {"_target_": "sam2.modeling.memory_encoder.Fuser", "num_layers": 1,
                      "layer": {"_target_": "sam2.modeling.memory_encoder.CXBlock", "dim": d_model,
                                "kernel_size": 7, "padding": 3, "layer_scale_init_value": 1e-6,
                                "use_dwconv": True}},
        },  # fmt: skip
        "num_maskmem": 7, "image_size": image_size,
        "sigmoid_scale_for_mem_enc": 20.0, "sigmoid_bias_for_mem_enc": -10.0,
        "use_mask_input_as_output_without_sam": True, "directly_add_no_mem_embed": True,
        "no_obj_embed_spatial": True, "use_high_res_features_in_sam": True, "multimask_output_in_sam": True,
        "iou_prediction_use_sigmoid": True, "use_obj_ptrs_in_encoder": True, "add_tpos_enc_to_obj_ptrs": True,
        "proj_tpos_enc_in_obj_ptrs": True, "use_signed_tpos_enc_to_obj_ptrs": True,
        "only_obj_ptrs_in_the_past_for_eval": True, "pred_obj_scores": True, "pred_obj_scores_mlp": True,
        "fixed_no_obj_ptr": True, "multimask_output_for_tracking": True,
        "use_multimask_token_for_obj_ptr": True,
        "multimask_min_pt_num": 0, "multimask_max_pt_num": 1, "use_mlp_for_obj_ptr_proj": True,
        "compile_image_encoder": False,
    }  # fmt: skip
    return {"model": model}


def build_sam2(folder: Path, image_size: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """Write `tiny_sam2.yaml` and `tiny_sam2.pt` ({"model": state_dict}) into `folder`; returns both paths."""
    from dynamictrl.preprocess.masks import import_sam2

    import_sam2()  # sam2's modules are the config's targets; import them without touching global Hydra
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.create(sam2_config(image_size))
    config = folder / "tiny_sam2.yaml"
    config.write_text(SAM2_HEADER + OmegaConf.to_yaml(cfg))
    torch.manual_seed(seed)
    model = instantiate(cfg.model, _recursive_=True)
    checkpoint = folder / "tiny_sam2.pt"
    torch.save({"model": model.state_dict()}, checkpoint)
    return config, checkpoint


def sam1_config(image_size: int = 128, embed_dim: int = 32, prompt_dim: int = 32, patch: int = 16) -> dict:
    """`segment_anything.modeling.Sam` as `build_sam._build_sam` assembles it, with every size shrunk
    (ViT of 2 blocks, one of them global, prompt/decoder width `prompt_dim`)."""
    grid = image_size // patch
    return {
        "_target_": "segment_anything.modeling.Sam",
        "_convert_": "all",  # Sam turns pixel_mean/std into tensors: give it plain lists
        "image_encoder": {
            "_target_": "segment_anything.modeling.ImageEncoderViT", "img_size": image_size,
            "patch_size": patch, "embed_dim": embed_dim, "depth": 2, "num_heads": 2, "mlp_ratio": 4,
            "norm_layer": {"_target_": "torch.nn.LayerNorm", "_partial_": True, "eps": 1e-6},
            "qkv_bias": True, "use_rel_pos": True, "global_attn_indexes": [1], "window_size": 4,
            "out_chans": prompt_dim,
        },
        "prompt_encoder": {
            "_target_": "segment_anything.modeling.PromptEncoder", "embed_dim": prompt_dim,
            "image_embedding_size": [grid, grid], "input_image_size": [image_size, image_size],
            "mask_in_chans": 4,
        },
        "mask_decoder": {
            "_target_": "segment_anything.modeling.MaskDecoder", "num_multimask_outputs": 3,
            "transformer": {"_target_": "segment_anything.modeling.TwoWayTransformer", "depth": 1,
                            "embedding_dim": prompt_dim, "mlp_dim": 2 * prompt_dim, "num_heads": 2},
            "transformer_dim": prompt_dim, "iou_head_depth": 3, "iou_head_hidden_dim": prompt_dim,
        },
        "pixel_mean": [123.675, 116.28, 103.53],
        "pixel_std": [58.395, 57.12, 57.375],
    }  # fmt: skip


def build_sam1(folder: Path, image_size: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """Write `tiny_sam.yaml` and `tiny_sam.pth` (a plain state dict) into `folder`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.create(sam1_config(image_size))
    config = folder / "tiny_sam.yaml"
    config.write_text(SAM1_HEADER + OmegaConf.to_yaml(cfg))
    torch.manual_seed(seed)
    checkpoint = folder / "tiny_sam.pth"
    torch.save(instantiate(cfg).state_dict(), checkpoint)
    return config, checkpoint
