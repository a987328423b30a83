"""The stages of the pretrained-model pipeline, each a small class with one call, so a user can swap one:

* :class:`TextToImage`: prompts -> images, a diffusers ``PixArtAlphaPipeline`` (Bootstrap3D's
  text-to-image model) loaded from a local pipeline directory, or a random tiny one.
* :class:`ImageToMultiView`: images -> an orbit of V views, a diffusers
  ``StableVideoDiffusionPipeline`` (SV3D is a fine-tuned Stable Video Diffusion whose frames are an
  orbit; VFusion3D's video model likewise, e.g. a ``fast3d train mvvideo`` export) loaded by
  :func:`fast3d.models.mvvideo.load_pipeline` from a local directory, or a random tiny one.
* :class:`Filter`: views -> (keep, score), VFusion3D's SVM on DINOv2 features
  (:mod:`fast3d.datagen.quality`); without a filter directory everything is kept with quality 1.0.
* :class:`Recaptioner`: images -> captions, a transformers BLIP (``BlipForConditionalGeneration``
  + ``BlipProcessor``) from a local directory, or a random tiny one.
* :class:`fast3d.datagen.matting.Matting`: views -> alphas, a segmentation / salient-object model.
* :class:`ElevationLabeler`: views -> the elevation of each orbit, VFusion3D's elevation MLP.

:data:`STAGE_KINDS` is the registry: config section -> ``kind`` -> ``"module:Class"``. A class is
built by ``Class.from_config(cfg, device)`` (``cfg`` the whole :class:`PipelineConfig`; the
section's ``options`` mapping holds a plug-in's own settings) and may define a static
``check_config(cfg)`` that :meth:`PipelineConfig.validate` calls before any work (check paths and
options there). To plug in another model, add one line here and select it with the section's
``kind``. A ``filter`` may return ``(keep, score)`` or ``(keep, score, captions)``: captions (a list,
one per sample, ``None`` or ``""`` for no caption) then replace the prompts, as a multimodal LLM that
grades and describes does.

Every model is either a local directory (``local_files_only``: nothing is ever downloaded) or
``"random-tiny"``: random weights drawn from a fixed seed, the same model every time (tests, smoke runs).
Each sample's noise comes from the generator of its own seed, so it does not depend on the other
samples of its batch (batched arithmetic can still change the last bits: the batch is recorded).
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from fast3d.io.images import to_uint8
from fast3d.models.checkpoints import seeded

RANDOM_TINY = "random-tiny"

STAGE_KINDS: dict[str, dict[str, str]] = {
    "mv": {"svd": "fast3d.datagen.pipeline.stages:ImageToMultiView"},
    "matting": {"segmentation": "fast3d.datagen.matting:Matting"},
    "filter": {"svm": "fast3d.datagen.pipeline.stages:Filter", "mvllm": "fast3d.datagen.mvllm:MVLLMFilter"},
    "recaption": {"blip": "fast3d.datagen.pipeline.stages:Recaptioner"},
}


def stage_class(section: str, kind: str):
    """The class registered for ``section``'s ``kind`` in :data:`STAGE_KINDS` (ValueError naming the key)."""
    kinds = STAGE_KINDS.get(section, {})
    if kind not in kinds:
        raise ValueError(f"{section}.kind must be one of {sorted(kinds)}; got {kind!r}")
    mod, name = kinds[kind].split(":", 1)
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{section}.kind {kind!r}: cannot import {kinds[kind]} ({e})") from None


def _no_options(section: str, kind: str, options: dict) -> None:
    if options:
        raise ValueError(f"{section}.options: the {kind!r} {section} stage takes no options; got {sorted(options)}")



def check_model_source(key: str, source: str) -> None:
    """ValueError naming ``key`` unless ``source`` is "random-tiny" or an existing local directory."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"{key} must be {RANDOM_TINY!r} or a local model directory; got {source!r}")
    if source != RANDOM_TINY and not os.path.isdir(source):
        raise ValueError(f"{key} must be {RANDOM_TINY!r} or a local model directory; got {source!r}, which is not "
                         f"a directory (weights are never downloaded)")


def _to_pil(images: Tensor,  # [N, 3, H, W] in [0, 1]
            ) -> list:
    from PIL import Image

    arr = to_uint8(images)
    return [Image.fromarray(a) for a in arr]


def _generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


class TextToImage:
    """``PixArtAlphaPipeline``: ``__call__(prompts, seeds) -> images [N, 3, R, R]`` in [0, 1]."""

    def __init__(self, model: str, resolution: int, steps: int, guidance: float, device: torch.device):
        from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

        from fast3d.models import mvdit

        check_model_source("t2i.model", model)
        if model == RANDOM_TINY:
            cfg = mvdit.MVDiTConfig.preset("tiny", grid_size=resolution)
            text_encoder, tokenizer = mvdit.build_text_encoder(cfg)
            pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=mvdit.build_vae(cfg),
                                       transformer=mvdit.build_transformer(cfg),
                                       scheduler=DPMSolverMultistepScheduler(**mvdit.NOISE_SCHEDULE))
            self.max_tokens = cfg.max_caption_tokens
        else:
            pipe = PixArtAlphaPipeline.from_pretrained(model, local_files_only=True, torch_dtype=torch.float32)
            self.max_tokens = 120  # PixArt-alpha's caption length
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.device = pipe.to(device), device
        self.resolution, self.steps, self.guidance = resolution, steps, guidance

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> Tensor:  # -> [N, 3, R, R] in [0, 1]
        out = self.pipe(list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance,
                        height=self.resolution, width=self.resolution, generator=_generators(seeds, self.device),
                        output_type="pt", use_resolution_binning=False, clean_caption=False,
                        max_sequence_length=self.max_tokens).images
        return out.float().clamp(0, 1).cpu()


class ImageToMultiView:
    """``StableVideoDiffusionPipeline`` whose V frames are an orbit around the object in the image:
    ``__call__(images [N, 3, H, W], seeds) -> views [N, V, 3, R, R]`` in [0, 1]."""

    def __init__(self, model: str, views: int, resolution: int, steps: int, min_guidance: float,
                 max_guidance: float, device: torch.device):
        from fast3d.models.mvvideo import load_pipeline

        pipe = load_pipeline(model, views, key="mv.model")
        self.pipe, self.device = pipe.to(device), device
        self.views, self.resolution, self.steps = views, resolution, steps
        self.min_guidance, self.max_guidance = min_guidance, max_guidance

    @staticmethod
    def check_config(cfg) -> None:
        from fast3d.models.mvvideo import check_source

        _no_options("mv", cfg.mv.kind, cfg.mv.options)
        check_source("mv.model", cfg.mv.model)

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> ImageToMultiView:
        m = cfg.mv
        return cls(m.model, m.views, m.resolution, m.steps, m.min_guidance, m.max_guidance, device)

    @torch.no_grad()
    def __call__(self, images: Tensor,  # [N, 3, H, W] in [0, 1]
                 seeds: list[int]) -> Tensor:  # -> [N, V, 3, R, R] in [0, 1]
        out = []
        for image, g in zip(_to_pil(images), _generators(seeds, self.device)):  # one video per call: its own noise
            frames = self.pipe(image, height=self.resolution, width=self.resolution, num_frames=self.views,
                               num_inference_steps=self.steps, min_guidance_scale=self.min_guidance,
                               max_guidance_scale=self.max_guidance, decode_chunk_size=self.views, generator=g,
                               output_type="pt").frames                                 # [1, V, 3, R, R]
            out.append(frames[0].float().clamp(0, 1).cpu())
        return torch.stack(out)


class Filter:
    """VFusion3D's quality filter from a directory written by ``fast3d datagen train-filter``:
    ``__call__(views [N, V, 3, H, W]) -> (keep [N] bool, score [N] float64)``, on the same
    features it was trained on (:func:`fast3d.datagen.quality.sample_features` of its ``frames``).
    ``threshold`` replaces the one saved with the filter when given."""

    def __init__(self, directory: str, threshold: float | None, device: torch.device):
        from fast3d.datagen.quality import FeatureExtractor

        self.quality = load_filter(directory)
        if threshold is not None:
            self.quality.threshold = float(threshold)
        self.extractor = FeatureExtractor.load(self.quality.dinov2)
        self.extractor.model.to(device)

    @staticmethod
    def check_config(cfg) -> None:
        _no_options("filter", cfg.filter.kind, cfg.filter.options)
        if cfg.filter.dir is not None:
            load_filter(cfg.filter.dir)

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> Filter | None:
        return None if cfg.filter.dir is None else cls(cfg.filter.dir, cfg.filter.threshold, device)

    def __call__(self, views: Tensor,  # [N, V, 3, H, W] in [0, 1]
                 ) -> tuple[Tensor, Tensor]:  # [N] bool, [N] float64
        from fast3d.datagen.quality import sample_features

        scores = self.quality.score(sample_features(self.extractor, views, self.quality.frames))
        return scores > self.quality.threshold, scores


class ElevationLabeler:
    """VFusion3D's elevation estimator (the MLP of ``fast3d datagen train-filter``) labelling each
    generated orbit: ``__call__(views [N, V, 3, H, W]) -> [N]`` elevation in radians of the orbit
    (the condition view's), clamped to +-``max_deg`` so that the cameras stay defined."""

    def __init__(self, directory: str, device: torch.device, max_deg: float = 89.0):
        from fast3d.datagen.quality import FeatureExtractor

        self.estimator = load_elevation(directory)
        self.extractor = FeatureExtractor.load(self.estimator.dinov2)
        self.extractor.model.to(device)
        self.max_rad = torch.pi * max_deg / 180

    @torch.no_grad()
    def __call__(self, views: Tensor,  # [N, V, 3, H, W] in [0, 1]
                 ) -> Tensor:  # [N] float64 radians
        from fast3d.datagen.quality import sample_features

        feats = sample_features(self.extractor, views, self.estimator.frames)
        return self.estimator.predict(feats).double().clamp(-self.max_rad, self.max_rad)


def load_filter(directory: str):
    """The QualityFilter in ``directory``; ValueError naming ``filter.dir`` when it is not one."""
    from fast3d.datagen.quality import QualityFilter

    if not isinstance(directory, str) or not os.path.isdir(directory):
        raise ValueError(f"filter.dir must be null or a directory written by `fast3d datagen train-filter`; "
                         f"got {directory!r}, which is not a directory")
    try:
        quality = QualityFilter.load(directory)
    except (ValueError, OSError) as e:
        raise ValueError(f"filter.dir {directory!r}: not a quality filter ({e})") from None
    if quality.dinov2 is None:
        raise ValueError(f"filter.dir {directory!r} names no dinov2 feature extractor")
    if quality.dinov2 != RANDOM_TINY and not os.path.isdir(quality.dinov2):
        raise ValueError(f"filter.dir {directory!r} names dinov2 {quality.dinov2!r}, which is not a local directory")
    return quality


def load_elevation(directory: str):
    """The ElevationEstimator in ``directory``; ValueError naming ``elevation.estimator`` when it is not one."""
    from fast3d.datagen.quality import ElevationEstimator

    if not isinstance(directory, str) or not os.path.isdir(directory):
        raise ValueError(f"elevation.estimator must be null or a directory written by `fast3d datagen train-filter` "
                         f"(with its elevation MLP); got {directory!r}, which is not a directory")
    try:
        est = ElevationEstimator.load(directory)
    except (ValueError, OSError) as e:
        raise ValueError(f"elevation.estimator {directory!r}: not an elevation estimator ({e})") from None
    if est.dinov2 is None or (est.dinov2 != RANDOM_TINY and not os.path.isdir(est.dinov2)):
        raise ValueError(f"elevation.estimator {directory!r} names dinov2 {est.dinov2!r}, which is not a local "
                         f"directory")
    return est


_TINY_WORDS = ("a", "an", "the", "red", "blue", "green", "small", "large", "wooden", "metal", "chair", "mug", "car",
               "lamp", "toy", "robot", "house", "tree", "on", "with", "white", "background", "3d", "model", "of")


def _tiny_captioner():
    """A random tiny BLIP with a BERT word-piece tokenizer over a few words (built offline)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *_TINY_WORDS]
    ids = {w: i for i, w in enumerate(vocab)}
    tokenizer = BertTokenizerFast(tokenizer_object=BertWordPieceTokenizer(ids, lowercase=True)._tokenizer,
                                  unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                                  mask_token="[MASK]", bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=ids["[DEC]"],
                         eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"]),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=32)
    with seeded(1):
        model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return model, processor


class Recaptioner:
    """BLIP captioning: ``__call__(images [N, 3, H, W]) -> N captions`` (greedy decoding)."""

    def __init__(self, model: str, max_tokens: int, device: torch.device):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        check_model_source("recaption.model", model)
        if model == RANDOM_TINY:
            self.model, self.processor = _tiny_captioner()
        else:
            self.model = BlipForConditionalGeneration.from_pretrained(model, local_files_only=True,
                                                                      dtype=torch.float32)
            self.processor = BlipProcessor.from_pretrained(model, local_files_only=True)
        self.model, self.device, self.max_tokens = self.model.to(device).eval(), device, max_tokens

    @staticmethod
    def check_config(cfg) -> None:
        _no_options("recaption", cfg.recaption.kind, cfg.recaption.options)
        if cfg.recaption.model is not None:
            check_model_source("recaption.model", cfg.recaption.model)

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> Recaptioner | None:
        r = cfg.recaption
        return None if r.model is None else cls(r.model, r.max_tokens, device)

    @torch.no_grad()
    def __call__(self, images: Tensor,  # [N, 3, H, W] in [0, 1]
                 ) -> list[str]:
        inputs = self.processor(images=_to_pil(images), return_tensors="pt").to(self.device)
        ids = self.model.generate(pixel_values=inputs.pixel_values, max_new_tokens=self.max_tokens,
                                  do_sample=False, num_beams=1)
        return [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
