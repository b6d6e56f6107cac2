"""A tiny random-weight Qwen2-VL (or Qwen2.5-VL) saved in the real on-disk layout.

The folder holds what a Hugging Face Qwen2-VL-Instruct folder holds (config.json, model.safetensors,
generation_config.json, tokenizer.json + tokenizer_config.json, chat_template.jinja, the image and
video processor configs), so `QwenVLCaptioner` loads it through exactly the code path real weights
take. The tokenizer is a byte-level BPE trained here on a few caption-style sentences, carrying the
special tokens the Qwen chat format and the vision placeholders need; the model's token ids point at
them. Building takes about a second on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

# The tokens of the Qwen chat and vision format, first in the vocabulary (ids 0..9, in this order).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|object_ref_start|>", "<|object_ref_end|>",
)  # fmt: skip

# The Qwen2-VL chat format (system turn by default; an image or video in a user turn becomes
# <|vision_start|><|..._pad|><|vision_end|>, which the processor expands to one pad per vision token).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
You are a helpful assistant.
Describe the person in this video: their clothing, hair and accessories, then the background.
The person in the image is wearing a red shirt and blue trousers, with black shoes and brown hair.
The person in the image is wearing a light gray hoodie with a pattern of small smiley faces.
The background is diagonal stripes of green and yellow. The background appears to be an indoor room.
The background shows a sunny beach with golden sand, gentle waves and palm trees in the breeze.
They are standing on a balcony with a wooden ceiling and a sliding glass door behind them.
She is wearing a white, knee-length dress with short sleeves, lace detailing and a ruffled hem.
0123456789 system user assistant video image frame clip pose dance street city night lights.
"""


def _tokenizer(vocab_size: int):
    """A Qwen2Tokenizer (the class real Qwen2-VL folders name) over a BPE trained on `_CORPUS`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Train with the same pre-tokenisation Qwen2Tokenizer applies, so the merges fit its input.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
    )  # fmt: skip
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",  # as in Qwen2-VL-Instruct
        extra_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=4096,
    )  # fmt: skip


def build(path: str | Path, variant: str = "qwen2_vl", seed: int = 0) -> Path:
    """Save a tiny random-weight model of `variant` ("qwen2_vl" or "qwen2_5_vl") to PATH; returns PATH.

    Text model: 2 layers, hidden 64, 4 heads of 16 (mrope_section 2+3+3 = 16/2), 2 KV heads.
    Vision tower: 2 blocks, 14-pixel patches, 2-frame temporal patches, 2x2 merge, as the real ones.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if variant not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"variant={variant!r}: expected 'qwen2_vl' or 'qwen2_5_vl'")
    path = Path(path)
    tokenizer = _tokenizer(vocab_size=400)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden, heads = 64, 4
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    assert sum(text["rope_parameters"]["mrope_section"]) == hidden // heads // 2
    vision = dict(depth=2, num_heads=2, patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    if variant == "qwen2_vl":
        vision |= dict(embed_dim=32, mlp_ratio=2, hidden_size=hidden)
        config_cls, model_cls, processor_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        vision |= dict(hidden_size=32, intermediate_size=64, out_hidden_size=hidden, window_size=56,
                       fullatt_block_indexes=[1])  # fmt: skip
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        processor_cls = Qwen2_5_VLProcessor
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # The Instruct folders stop on <|im_end|> or <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
    )  # fmt: skip
    model.save_pretrained(path)

    # Small pixel bounds so tiny clips stay a few dozen vision tokens (the real folders allow far more).
    pixels = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(path)
    return path
