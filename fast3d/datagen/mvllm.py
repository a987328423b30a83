"""Bootstrap3D's MV-LLaVA stage: a multimodal LLM looks at the views of a sample, describes the
object, then grades its quality 1-5; samples scoring at least a threshold are kept, with the
description as their caption and the score in their metadata.

Bootstrap3D (Sun et al. 2024, /work/shared/seeds/bootstrap3d-summary.txt): MV-LLaVA takes 4 views,
does "Chain-of-Thought quality assessment: the model first describes the content, then assigns a
quality score based on the description and the multi-view images"; "only high-quality outputs
(scores 4-5) are retained and rewritten as dense descriptive captions". Here the 4 views (``picks``
of the orbit, spread around it) are tiled 2x2 into one picture (as Bootstrap3D's multi-view
diffusion model sees them) and the conversation has two turns: the description, then the grade
(asked with the description in context). The prompts, the turn format and the training answer
format live in a YAML file (``train/configs/mvllm_prompts.yaml``).

The model is a transformers LLaVA (``LlavaForConditionalGeneration`` + its processor) from a local
directory (``local_files_only``: nothing is downloaded) or ``"random-tiny"``: random weights from a
fixed seed with a byte-level tokenizer built offline from the ``tokenizers`` library (tests).

The score is parsed strictly (:func:`parse_score`): an answer without exactly one unambiguous score
in 1..5 is rejected and counted, never guessed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d._yaml import load_yaml
from fast3d.io.images import to_uint8
from fast3d.models.checkpoints import dataclass_from_dict, seeded
from fast3d.models.mvdit import make_grid

RANDOM_TINY = "random-tiny"
IMAGE = "<image>"     # where the views go in a prompt (the processor expands it to the image tokens)


# ----------------------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Prompts:
    """The conversation: ``turn`` wraps each user message (``{text}``) and ends where the assistant
    answers; ``end`` closes an answer; ``describe`` and ``grade`` are the two questions (the first
    turn gets ``<image>`` and a newline before it); ``answer`` formats the grading answer of a
    training record (``{reasoning}``, ``{score}``)."""
    turn: str = "USER: {text} ASSISTANT:"
    end: str = "</s>"
    describe: str = ""
    grade: str = ""
    answer: str = "{reasoning} Score: {score}"

    def validate(self, source: str) -> None:
        for name in ("turn", "describe", "grade", "answer"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{source}: {name} must be a non-empty string; got {v!r}")
        if not isinstance(self.end, str):
            raise ValueError(f"{source}: end must be a string; got {self.end!r}")
        if self.turn.count("{text}") != 1:
            raise ValueError(f"{source}: turn must contain {{text}} exactly once; got {self.turn!r}")
        if "{score}" not in self.answer:
            raise ValueError(f"{source}: answer must contain {{score}}; got {self.answer!r}")
        for name in ("describe", "grade"):
            if IMAGE in getattr(self, name):
                raise ValueError(f"{source}: {name} must not contain {IMAGE} (the first turn gets it)")
        # Format once with dummy values: an unknown {slot} is an error now, not at the first sample.
        try:
            self.turn.format(text="x")
            self.answer.format(reasoning="x", score=3)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{source}: turn/answer has a placeholder other than {{text}} / {{reasoning}}, "
                             f"{{score}} ({e!r})") from None

    def first(self) -> str:
        """The prompt up to the description."""
        return self.turn.format(text=f"{IMAGE}\n{self.describe}")

    def second(self, description: str) -> str:
        """The prompt up to the grade, with the description in context."""
        return f"{self.first()} {description}{self.end}{self.turn.format(text=self.grade)}"

    def training_segments(self, description: str, score: int, reasoning: str = "") -> list[tuple[str, bool]]:
        """The whole conversation as (text, is an answer) segments: answers are what the model learns."""
        graded = self.answer.format(reasoning=reasoning, score=score).strip()
        return [(self.first(), False), (f" {description}{self.end}", True), (self.turn.format(text=self.grade), False),
                (f" {graded}{self.end}", True)]


def load_prompts(path: str) -> Prompts:
    """The prompts YAML at ``path``, checked (unknown keys named)."""
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"prompts must be a YAML file; got {path!r}, which is not a file")
    p = dataclass_from_dict(Prompts, load_yaml(path), what=f"prompts file {path!r}")
    p.validate(f"prompts file {path!r}")
    return p


# ------------------------------------------------------------------------------------------- score

# "Score: 4", "quality score is 4/5", "**Rating:** 5 out of 5", "Grade = 3": a keyword, up to a few
# separator characters or the words is/of, then an integer, then optionally a denominator.
_KEYWORD = re.compile(
    r"\b(?:quality\s+)?(?:score|rating|grade)\b\s*(?:[:=*]|-(?=\s)|\bis\b|\bof\b|\s)*\s*"
    r"(?P<num>[+-]?\d+(?:[.,]\d+)?)(?:\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?))?", re.IGNORECASE)
# ("-" separates only before a space: "Score: -3" is a negative number, rejected.)
# "4/5", "4 out of 5" anywhere.
_FRACTION = re.compile(r"(?<![\w.])(?P<num>\d+(?:[.,]\d+)?)\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?)(?![\w.]\d)",
                       re.IGNORECASE)
# The whole answer is a number: "4", "4.", "(4)".
_BARE = re.compile(r"^\W*(?P<num>[+-]?\d+(?:[.,]\d+)?)\W*$")
SCORE_MIN, SCORE_MAX = 1, 5


def parse_score(answer: str) -> int | None:
    """The 1-5 quality score an answer states, or None when it states none unambiguously.

    Read: ``Score: 4``, ``score 4``, ``quality score is 4/5``, ``Rating: 5 out of 5``, ``**Grade:** 3``,
    ``4/5`` or ``4 out of 5`` anywhere, or an answer that is only the number. None (rejected, never
    guessed) for: no such statement; a number that is not an integer (``4.5``) or outside 1..5; a
    denominator other than 5 (``8/10``); several statements that disagree (``Score: 3 ... Score: 4``).
    """
    if not isinstance(answer, str):
        raise ValueError(f"answer must be a string; got {type(answer).__name__}")
    found = []
    for pattern in (_KEYWORD, _FRACTION):
        for m in pattern.finditer(answer):
            found.append((m.group("num"), m.group("den")))
    bare = _BARE.match(answer)
    if bare and not found:
        found.append((bare.group("num"), None))
    values = set()
    for num, den in found:
        if den is not None and den != "5":
            return None
        if not re.fullmatch(r"\d+", num):
            return None
        v = int(num)
        if not SCORE_MIN <= v <= SCORE_MAX:
            return None
        values.add(v)
    return values.pop() if len(values) == 1 else None


# ------------------------------------------------------------------------------------------ models


def tiny_tokenizer():
    """A byte-level tokenizer built offline: the 256 byte symbols and no merges (any text encodes,
    decoding is exact), plus ``<unk> <s> </s> <pad> <image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=[IMAGE])


def tiny_llava(seed: int = 0, vision_layers: int = 4):
    """A random tiny LLaVA (CLIP vision tower at 32 px with 8-px patches, a 2-layer Llama) and its
    processor, the same for the same seed. Returns (model, processor)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", IMAGE)}
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=vision_layers,
                                       num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        image_token_index=ids[IMAGE], vision_feature_layer=-1, vision_feature_select_strategy="default")
    with seeded(seed):
        model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["</s>"]
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    return model, processor


def check_source(key: str, source: str) -> None:
    """ValueError naming ``key`` unless ``source`` is "random-tiny" or a local LLaVA directory."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"{key} must be {RANDOM_TINY!r} or a local LLaVA model directory; got {source!r}")
    if source == RANDOM_TINY:
        return
    if not os.path.isdir(source):
        raise ValueError(f"{key} must be {RANDOM_TINY!r} or a local LLaVA model directory; got {source!r}, which is "
                         f"not a directory (weights are never downloaded)")
    cfg = os.path.join(source, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"{key} {source!r} is not a transformers model directory (no config.json)")
    import json

    with open(cfg) as f:
        kind = json.load(f).get("model_type")
    if kind not in ("llava", "llava_next", "llava_onevision"):
        raise ValueError(f"{key} {source!r} holds a {kind!r} model; expected a LLaVA (model_type 'llava')")


def load_llava(source: str, key: str = "model"):
    """(model, processor) of ``source`` ("random-tiny" or a local directory), float32, eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    check_source(key, source)
    if source == RANDOM_TINY:
        model, processor = tiny_llava()
    else:
        model = LlavaForConditionalGeneration.from_pretrained(source, local_files_only=True, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    return model.eval(), processor


def tile_views(views: Tensor,       # [N, V, 3, H, W] in [0, 1]
               picks: tuple) -> Tensor:  # -> [N, 3, 2H, 2W]
    """The 4 views ``picks`` of each sample tiled 2x2 (row-major: picks[0] top left)."""
    if views.dim() != 5 or views.shape[2] != 3:
        raise ValueError(f"views must be [N, V, 3, H, W]; got {tuple(views.shape)}")
    V = views.shape[1]
    if len(picks) != 4 or not all(isinstance(i, int) and 0 <= i < V for i in picks):
        raise ValueError(f"picks must be 4 view indices in [0, {V}) (the sample has {V} views); got {list(picks)}")
    return make_grid(views[:, list(picks)])


def spread_picks(num_views: int) -> tuple:
    """4 views spread evenly over an orbit of ``num_views`` (0, V/4, V/2, 3V/4, rounded down)."""
    if num_views < 4:
        raise ValueError(f"a sample needs at least 4 views for the 2x2 grid; got {num_views}")
    return tuple(i * num_views // 4 for i in range(4))


def to_pil(images: Tensor) -> list:  # [N, 3, H, W] in [0, 1]
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]


# ------------------------------------------------------------------------------------------- stage

@dataclass
class MVLLMResult:
    """One call's verdicts: keep [N] bool, score [N] float64 (NaN: no parsable score), the
    descriptions and the raw grading answers."""
    keep: Tensor
    score: Tensor
    descriptions: list
    answers: list


class MVLLMFilter:
    """MV-LLaVA filtering and dense captions: ``__call__(views [N, V, 3, H, W]) -> MVLLMResult``.

    Args:
        model: a local LLaVA directory or "random-tiny".
        prompts: the prompts YAML file.
        threshold: keep samples scoring >= this (Bootstrap3D keeps 4 and 5).
        picks: the 4 views tiled 2x2; None spreads them over the orbit.
        max_new_tokens: the longest description (and grading answer).
        batch_size: samples per generate call.
        device: where the model runs.

    Counters over the stage's life: ``seen``, ``kept``, ``rejected_low`` (scored below the
    threshold), ``rejected_unparsed`` (no parsable score).
    """

    def __init__(self, model: str, prompts: str, threshold: int = 4, picks: tuple | None = None,
                 max_new_tokens: int = 256, batch_size: int = 8, device: torch.device | str = "cpu"):
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not SCORE_MIN <= threshold <= SCORE_MAX:
            raise ValueError(f"threshold must be an int in [{SCORE_MIN}, {SCORE_MAX}]; got {threshold!r}")
        for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        self.prompts = load_prompts(prompts)
        self.model, self.processor = load_llava(model, key="model")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.processor.tokenizer.padding_side = "left"   # generation continues each prompt's last token
        self.threshold, self.picks, self.max_new_tokens, self.batch_size = threshold, picks, max_new_tokens, batch_size
        self.seen = self.kept = self.rejected_low = self.rejected_unparsed = 0

    @torch.no_grad()
    def _generate(self, texts: list[str], images: list) -> list[str]:
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [s.strip() for s in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @staticmethod
    def check_config(cfg) -> None:
        """The pipeline's check before any work (``filter.kind: mvllm``)."""
        options_of(cfg)

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> MVLLMFilter:
        """The stage of a pipeline config (``filter.kind: mvllm``, settings in ``filter.options``)."""
        o = options_of(cfg)
        return cls(o.model, o.prompts, o.threshold, None if o.picks is None else tuple(o.picks), o.max_new_tokens,
                   o.batch_size, device)

    def __call__(self, views: Tensor,  # [N, V, 3, H, W] in [0, 1]
                 ) -> tuple[Tensor, Tensor, list]:
        """The pipeline's filter call: (keep [N] bool, score [N] float64, descriptions as captions)."""
        r = self.assess(views)
        return r.keep, r.score, r.descriptions

    def assess(self, views: Tensor,  # [N, V, 3, H, W] in [0, 1]
               ) -> MVLLMResult:
        """Describe and grade each sample (keep, score, descriptions and the raw grading answers)."""
        picks = self.picks if self.picks is not None else spread_picks(views.shape[1])
        grids = to_pil(tile_views(views.float().cpu(), picks))
        descriptions, answers = [], []
        for b in range(0, len(grids), self.batch_size):
            imgs = grids[b:b + self.batch_size]
            desc = self._generate([self.prompts.first()] * len(imgs), imgs)
            answers += self._generate([self.prompts.second(d) for d in desc], imgs)
            descriptions += desc
        return self.verdicts(descriptions, answers)

    def verdicts(self, descriptions: list[str], answers: list[str]) -> MVLLMResult:
        """Keep / score from the grading answers (strict parsing), counted."""
        scores = [parse_score(a) for a in answers]
        keep = torch.tensor([s is not None and s >= self.threshold and bool(d.strip())
                             for s, d in zip(scores, descriptions)], dtype=torch.bool)
        self.seen += len(scores)
        self.kept += int(keep.sum())
        self.rejected_unparsed += sum(s is None for s in scores)
        self.rejected_low += sum(s is not None and s < self.threshold for s in scores)
        score = torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float64)
        return MVLLMResult(keep=keep, score=score, descriptions=descriptions, answers=answers)

    def counts(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "rejected_low": self.rejected_low,
                "rejected_unparsed": self.rejected_unparsed}


@dataclass(frozen=True)
class MVLLMOptions:
    """The pipeline's ``filter.options`` for ``filter.kind: mvllm`` (fast3d.datagen.pipeline)."""
    model: str = RANDOM_TINY          # local LLaVA directory (e.g. a `fast3d train mvllm` export) or random-tiny
    prompts: str = ""                 # the prompts YAML
    threshold: int = 4                # Bootstrap3D keeps scores 4 and 5
    picks: tuple | None = None        # the 4 views tiled; null: spread over the orbit
    max_new_tokens: int = 256
    batch_size: int = 8


def options_of(cfg) -> MVLLMOptions:
    """The checked ``filter.options`` of a pipeline config whose ``filter.kind`` is ``mvllm``."""
    f = cfg.filter
    if f.dir is not None or f.threshold is not None:
        raise ValueError(f"filter.kind 'mvllm' takes its settings in filter.options (model, prompts, threshold, ...); "
                         f"filter.dir and filter.threshold must be null, got {f.dir!r} and {f.threshold!r}")
    o = dataclass_from_dict(MVLLMOptions, f.options or {}, what="filter.options")
    check_source("filter.options.model", o.model)
    load_prompts(o.prompts)
    if isinstance(o.threshold, bool) or not isinstance(o.threshold, int) or not SCORE_MIN <= o.threshold <= SCORE_MAX:
        raise ValueError(f"filter.options.threshold must be an int in [{SCORE_MIN}, {SCORE_MAX}]; got {o.threshold!r}")
    if o.picks is not None and (len(o.picks) != 4 or not all(isinstance(i, int) and i >= 0 for i in o.picks)):
        raise ValueError(f"filter.options.picks must be null or 4 view indices; got {o.picks!r}")
    for name in ("max_new_tokens", "batch_size"):
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"filter.options.{name} must be a positive int; got {v!r}")
    return o


# ----------------------------------------------------------------------------------------- records

def caption_records(data: str, out: str, score: int | None = None, seed: int = 0) -> dict:
    """Instruction-tuning records (``fast3d train mvllm``'s ``data.annotations``) for the samples of
    the shards in ``data``, with each sample's own caption as the description: a stand-in for the
    paper's GPT-4V annotations, to run the recipe on procedural data (whose captions are true, made
    from the asset's parts). The score is ``score`` for every record, or with ``score=None`` drawn
    uniformly from 1..5 per key (seeded by ``seed`` and the key: the same file every time), so the
    demo has every grade; the reasoning says which. Samples without a caption are skipped and counted.

    Args:
        data: a directory of multi-view shards (e.g. ``fast3d datagen procedural --rig orbit16``).
        out: the JSONL file to write (atomically).
        score: the grade of every record (1..5), or None for seeded random grades.
        seed: the seed of the random grades.

    Returns:
        {"records": written, "skipped": samples without a caption, "out": out}.
    """
    import hashlib
    import json

    from fast3d.data.dataset import MultiViewDataset
    from fast3d.io.atomic import atomic_open

    if score is not None and (isinstance(score, bool) or not isinstance(score, int)
                              or not SCORE_MIN <= score <= SCORE_MAX):
        raise ValueError(f"score must be null or an int in [{SCORE_MIN}, {SCORE_MAX}]; got {score!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    if not isinstance(data, str) or not os.path.isdir(data):
        raise ValueError(f"data must be a directory of multi-view shards; got {data!r}, which is not a directory")
    reasoning = ("Demo record: the description is the asset's caption, the score a fixed grade." if score is not None
                 else "Demo record: the description is the asset's caption, the score drawn at random.")
    records, skipped = [], 0
    for s in MultiViewDataset(data, views=1, resolution=8):
        caption = (s.get("caption") or "").strip()
        if not caption:
            skipped += 1
            continue
        grade = score
        if grade is None:
            digest = hashlib.sha256(f"{seed}:{s['key']}".encode()).digest()
            grade = SCORE_MIN + int.from_bytes(digest[:8], "little") % (SCORE_MAX - SCORE_MIN + 1)
        records.append({"key": s["key"], "description": caption, "score": grade, "reasoning": reasoning})
    if not records:
        raise ValueError(f"data {data!r}: no captioned samples to make records of ({skipped} without a caption)")
    records.sort(key=lambda r: r["key"])
    with atomic_open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return {"records": len(records), "skipped": skipped, "out": out}
