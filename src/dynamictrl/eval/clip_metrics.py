"""CLIP temporal consistency and text alignment, from a local CLIP folder (transformers layout).

- consistency: mean cosine similarity of consecutive frames' image embeddings;
- alignment: mean cosine similarity of each frame's image embedding with the prompt's text embedding
  (the prompt comes from the animate stage's NAME.json `prompt_used`, or NAME.txt, beside the video).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class ClipScorer:
    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def image_embeds(self, frames: np.ndarray, batch: int = 32) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (T, D) unit vectors."""
        out = []
        for i in range(0, len(frames), batch):
            px = self.processor(images=list(frames[i : i + batch]), return_tensors="pt")["pixel_values"]
            e = self.model.get_image_features(pixel_values=px.to(self.device))
            e = e.pooler_output if hasattr(e, "pooler_output") else e
            out.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_embed(self, prompt: str) -> torch.Tensor:
        tok = self.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True)
        e = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                         attention_mask=tok["attention_mask"].to(self.device))  # fmt: skip
        e = e.pooler_output if hasattr(e, "pooler_output") else e
        return torch.nn.functional.normalize(e, dim=-1)[0]


def consistency(embeds: torch.Tensor) -> float:
    if len(embeds) < 2:
        return float("nan")
    return float((embeds[1:] * embeds[:-1]).sum(-1).mean())


def alignment(embeds: torch.Tensor, text: torch.Tensor) -> float:
    return float((embeds @ text).mean())


def prompt_for(video: Path) -> str | None:
    """The prompt a generated video was made with: NAME.json's prompt_used / prompt, or NAME.txt."""
    meta = video.with_suffix(".json")
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("prompt_used") or info.get("prompt"):
            return info.get("prompt_used") or info.get("prompt")
    txt = video.with_suffix(".txt")
    return txt.read_text().strip() or None if txt.is_file() else None
