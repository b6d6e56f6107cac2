"""The production caption backend: Qwen2-VL / Qwen2.5-VL from a local folder, batched.

The paper captions its training videos with Qwen2-VL in one style: the person's clothing and looks
first ("The person in the image is wearing ..."), then the background ("The background ...").
The background sentence matters most: the model only sees the person in the reference image, so the
background it draws comes from the text. The default prompt asks for that style.

Each clip goes to the model as a video (a list of frames sampled evenly from it) through the
qwen-vl-utils recipe (`process_vision_info` resizes the frames to whole vision patches), and the
clips are captioned `batch_size` at a time with left padding, so every row's answer starts at the
same column and decoding takes only the new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dynamictrl.errors import UserError

DEFAULT_PROMPT = (
    "Describe this video of a person for a video generation model, in plain sentences and no lists. "
    "First describe the person: their clothing with its colours, patterns and details, their hair "
    "and any accessories, starting with \"The person in the image is wearing\". Then describe the "
    "background and the setting behind them in one or two sentences starting with \"The background\". "
    "Do not describe the motion."
)

# model_type in config.json -> the backend's name (recorded in each shard's json).
SUPPORTED = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}
DTYPES = ("auto", "bfloat16", "float16", "float32")


class QwenVLCaptioner:
    """Qwen2-VL / Qwen2.5-VL captions, one per clip: `captioner(clips) -> list[str]`.

    Args:
        path: a local Hugging Face folder of a Qwen2-VL or Qwen2.5-VL (Instruct) model; nothing is
            downloaded.
        prompt: the user turn after the video; None: `DEFAULT_PROMPT`, the paper's caption style.
        num_frames: frames sampled evenly from each clip (all of a shorter clip); the processor pairs
            frames into temporal patches, so an odd count gets its last frame repeated.
        max_pixels, min_pixels: bounds on each frame's area after resizing (aspect kept, sides
            multiples of 28); None: qwen-vl-utils' defaults for video (at least 128 x 28 x 28).
        resized_size: (height, width) to resize every frame to instead (rounded to 28); overrides
            the pixel bounds.
        max_new_tokens: the longest caption, in tokens.
        batch_size: clips per `generate` call.
        device: "auto" (cuda:$LOCAL_RANK, or cuda, when there is a GPU, else cpu) or a torch device.
        dtype: "auto" (bfloat16 on a GPU that has it, else float32), "bfloat16", "float16", "float32".
        do_sample: sample with the folder's generation config instead of greedy decoding.
        attn_implementation: passed to `from_pretrained` ("sdpa", "flash_attention_2", ...); None:
            transformers' default.
    """

    def __init__(
        self,
        path: str,
        prompt: str | None = None,
        num_frames: int = 8,
        max_pixels: int | None = 360 * 420,
        min_pixels: int | None = None,
        resized_size: list[int] | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 4,
        device: str = "auto",
        dtype: str = "auto",
        do_sample: bool = False,
        attn_implementation: str | None = None,
    ):
        import torch
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor

        for key, value in (("num_frames", num_frames), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
            if value < 1:
                raise UserError(f"caption.{key}={value}: must be at least 1")
        if dtype not in DTYPES:
            raise UserError(f"caption.dtype={dtype}: expected one of {', '.join(DTYPES)}")
        if resized_size is not None and len(resized_size) != 2:
            raise UserError(f"caption.resized_size={list(resized_size)}: expected [height, width]")
        folder = Path(path).expanduser()
        model_type = _model_type(folder)

        self.name = SUPPORTED[model_type]
        self.version = f"transformers-{transformers.__version__}+{folder.name}"
        self.prompt, self.num_frames, self.batch_size = prompt or DEFAULT_PROMPT, num_frames, batch_size
        self.max_new_tokens, self.do_sample = max_new_tokens, do_sample
        if resized_size is not None:
            self._size = {"resized_height": int(resized_size[0]), "resized_width": int(resized_size[1])}
        else:
            bounds = (("min_pixels", min_pixels), ("max_pixels", max_pixels))
            self._size = {k: v for k, v in bounds if v is not None}
        self.device = torch.device(_device(device))
        self.dtype = _dtype(dtype, self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(
                folder, dtype=self.dtype, local_files_only=True,
                **({"attn_implementation": attn_implementation} if attn_implementation else {}),
            ).to(self.device).eval()  # fmt: skip
        except (OSError, ValueError) as err:  # missing or unreadable files in the folder
            raise UserError(f"caption.path={folder}: cannot load the model: {str(err).splitlines()[0]}") from err

    def messages(self, clip: np.ndarray) -> list[dict]:
        """One clip (T, H, W, 3) uint8 RGB -> its chat: one user turn with the video and the prompt."""
        from PIL import Image

        if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or len(clip) == 0:
            raise ValueError(f"caption: expected a (T, H, W, 3) uint8 clip, got {clip.shape} {clip.dtype}")
        idx = np.linspace(0, len(clip) - 1, min(self.num_frames, len(clip))).round().astype(int)
        video = {"type": "video", "video": [Image.fromarray(clip[i]) for i in idx], **self._size}
        return [{"role": "user", "content": [video, {"type": "text", "text": self.prompt}]}]

    def inputs(self, clips: list[np.ndarray]):
        """Clips -> the processor's batch (input_ids (B, L) left-padded, attention_mask, the video
        patches and grids), on the model's device."""
        from qwen_vl_utils import process_vision_info

        chats = [self.messages(c) for c in clips]
        text = [self.processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
        _, videos, video_kwargs = process_vision_info(
            chats, return_video_kwargs=True, return_video_metadata=True,
            image_patch_size=self.processor.video_processor.patch_size,
        )  # fmt: skip
        videos, metadata = map(list, zip(*videos, strict=True))
        # process_vision_info already resized the frames to whole patches: resizing again could only
        # move them off the size the user configured (so the processor's pixel cap has nothing to do).
        return self.processor(
            text=text, videos=videos, video_metadata=metadata, do_resize=False, cap_pixels_per_frame=False,
            padding=True, padding_side="left", return_tensors="pt", **video_kwargs,
        ).to(self.device)  # fmt: skip

    def __call__(self, clips: list[np.ndarray]) -> list[str]:
        """clips: list of (T, H, W, 3) uint8 RGB -> one caption per clip, in order, stripped."""
        import torch

        captions: list[str] = []
        for start in range(0, len(clips), self.batch_size):
            batch = self.inputs(clips[start : start + self.batch_size])
            with torch.inference_mode():
                out = self.model.generate(
                    **batch, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                )  # (B, L + new), the prompt first in every row thanks to left padding
            new = out[:, batch["input_ids"].shape[1] :]
            captions += [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return captions

    def close(self) -> None:
        import torch

        self.model = self.processor = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _model_type(folder: Path) -> str:
    """The folder's model_type, or a UserError naming caption.path when it is not a Qwen-VL folder."""
    if not folder.is_dir():
        raise UserError(f"caption.path={folder}: no such folder")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"caption.path={folder}: no config.json, not a Hugging Face model folder")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(f"caption.path={folder}: model_type {model_type!r} is not Qwen2-VL or Qwen2.5-VL "
                        f"(expected one of {', '.join(SUPPORTED)})")  # fmt: skip
    return model_type


def _device(device: str) -> str:
    from dynamictrl.utils.device import local_device

    # Under torchrun / SLURM each rank captions its own share of the videos on its own GPU.
    return local_device(device)


def _dtype(dtype: str, device):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
