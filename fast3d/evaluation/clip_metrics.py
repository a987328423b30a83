"""CLIP scores of generated images: CLIP-R precision (Bootstrap3D, after DreamFusion), and CLIP text /
image similarity (VFusion3D), from a transformers ``CLIPModel`` loaded from a local directory.

Backbones. ``load_clip(spec)`` takes a local directory holding a transformers CLIP checkpoint and its
tokenizer (``config.json``, weights, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``): nothing
is downloaded. Its report name is read from the vision tower's config: width 768 / patch 32 is
``clip-vit-b-32``, 768 / 16 ``clip-vit-b-16``, 1024 / 14 ``clip-vit-l-14`` (``-336`` at 336 px),
1280 / 14 ``clip-vit-h-14``, 1664 / 14 ``clip-vit-bigg-14``; another shape is named by its numbers
(``clip-vit-w512-p16-224``). ``"random-tiny"`` is a two-layer CLIP with random weights from a fixed
seed and a byte-level tokenizer, for tests; it is reported as ``clip-random-tiny``, never under a
real backbone's name.

Preprocessing as CLIP's: the image (float RGB in [0, 1]) is resized so its short side is the
model's input size (bicubic, antialiased), centre-cropped square, and normalised with CLIP's mean
and standard deviation. Embeddings are L2-normalised; a similarity is their cosine, in [-1, 1]
(not CLIPScore's 100 x max(cos, 0)).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor

RANDOM_TINY = "random-tiny"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_KNOWN = {(768, 32): "b-32", (768, 16): "b-16", (1024, 14): "l-14", (1280, 14): "h-14", (1408, 14): "g-14",
          (1664, 14): "bigg-14"}


def backbone_name(vision_config) -> str:
    """The report name of a CLIP vision tower (module docstring)."""
    w, p, s = vision_config.hidden_size, vision_config.patch_size, vision_config.image_size
    if (w, p) in _KNOWN:
        return f"clip-vit-{_KNOWN[(w, p)]}" + ("" if s == 224 else f"-{s}")
    return f"clip-vit-w{w}-p{p}-{s}"


class Clip:
    """A frozen CLIP model with its tokenizer and report ``name``."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.size = model.config.vision_config.image_size
        self.max_tokens = model.config.text_config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Tensor  # [N, 3, H, W] RGB in [0, 1]
                     ) -> Tensor:          # [N, D] unit vectors
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W]; got {tuple(images.shape)}")
        x = images.float().to(self.device)
        H, W = x.shape[-2:]
        scale = self.size / min(H, W)
        h, w = max(self.size, round(H * scale)), max(self.size, round(W * scale))
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (h - self.size) // 2, (w - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        e = self.model.get_image_features(pixel_values=(x - mean) / std)
        e = e if isinstance(e, Tensor) else e.pooler_output
        return F.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:  # -> [N, D] unit vectors
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of str; got {texts!r:.80}")
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        e = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                         attention_mask=tok.attention_mask.to(self.device))
        e = e if isinstance(e, Tensor) else e.pooler_output
        return F.normalize(e.float(), dim=-1)


def _random_tiny() -> Clip:
    from transformers import ByT5Tokenizer, CLIPConfig, CLIPModel

    tokenizer = ByT5Tokenizer()  # bytes: no vocabulary file; its </s> (id 1) ends every text
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = CLIPModel(config)
    finally:
        torch.random.set_rng_state(state)
    return Clip(model, tokenizer, "clip-random-tiny")


def load_clip(spec: str, device: torch.device | str = "cpu") -> Clip:
    """A CLIP backbone: a local transformers CLIP directory, or ``"random-tiny"`` (tests only).

    Raises:
        ValueError: naming ``spec`` when it is not a directory holding a CLIP checkpoint.
    """
    if spec == RANDOM_TINY:
        return _moved(_random_tiny(), device)
    if not isinstance(spec, str) or not os.path.isdir(spec):
        raise ValueError(f"clip backbone {spec!r} is not a directory: pass a local transformers CLIP checkpoint "
                         f"(config.json, weights, tokenizer files; nothing is downloaded) or {RANDOM_TINY!r}")
    cfg_path = os.path.join(spec, "config.json")
    try:
        with open(cfg_path) as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"clip backbone {spec!r}: no readable config.json ({e})") from None
    if kind != "clip":
        raise ValueError(f"clip backbone {spec!r}: config.json's model_type is {kind!r}; expected 'clip'")
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(spec, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except OSError as e:
        raise ValueError(f"clip backbone {spec!r}: {e}") from None
    return _moved(Clip(model, tokenizer, backbone_name(model.config.vision_config)), device)


def _moved(clip: Clip, device) -> Clip:
    clip.model.to(device)
    return clip


def clip_r_precision(sim: Tensor,    # [N, P] similarity of each image to each prompt
                     truth: Tensor,  # [N] index of each image's own prompt
                     ) -> Tensor:    # [N] 1.0 where the image retrieves its prompt, else 0.0
    """Top-1 CLIP-R precision per image (Bootstrap3D, after DreamFusion): an image scores 1 when
    its own prompt is strictly the most similar of the prompt set (a tie with another prompt is a
    miss); the precision of a set is the mean."""
    if sim.dim() != 2 or truth.shape != sim.shape[:1]:
        raise ValueError(f"sim must be [N, P] and truth [N]; got {tuple(sim.shape)} and {tuple(truth.shape)}")
    if sim.shape[1] < 2:
        raise ValueError(f"CLIP-R precision needs a prompt set of at least 2 prompts; got {sim.shape[1]}")
    truth = truth.to(sim.device).long()
    if ((truth < 0) | (truth >= sim.shape[1])).any():
        raise ValueError(f"truth must index the {sim.shape[1]} prompts; got {truth.tolist()}")
    own = sim.gather(1, truth[:, None])[:, 0]
    others = sim.scatter(1, truth[:, None], float("-inf")).max(1).values
    return (own > others).float()


def render_scores(clips: list[Clip],
                  renders: Tensor,         # [V, 3, H, W] in [0, 1], a reconstruction's novel views
                  inputs: Tensor | None,   # [I, 3, H, W] in [0, 1], the views it was made from
                  caption: str | None) -> dict:
    """VFusion3D's CLIP scores of one reconstruction, per backbone: ``clip_image:<backbone>``, the
    mean cosine of every render with every input view, and, with a caption, ``clip_text:<backbone>``,
    the mean cosine of the renders with it."""
    out = {}
    for c in clips:
        e = c.embed_images(renders)                                             # [V, D]
        if inputs is not None:
            out[f"clip_image:{c.name}"] = float((e @ c.embed_images(inputs).T).mean())
        if caption:
            out[f"clip_text:{c.name}"] = float((e @ c.embed_texts([caption]).T).mean())
    return out
