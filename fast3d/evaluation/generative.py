"""Evaluation of generators (multi-view diffusion, the multi-view DiT, whole text/image-to-3D
pipelines) as Bootstrap3D and VFusion3D report them: each prompt's generated images (views or
renders) are scored by CLIP-R precision among the whole prompt set, CLIP text similarity to their
prompt, CLIP image similarity to the input image (image-conditioned generators), per CLIP backbone;
and the set of all generated images by FID against a reference image folder.

The generator is a callable, so this layer needs no model: ``generate(index, prompt, image, stem)``
writes the sample's images as PNG files whose paths start with ``stem`` and returns their paths.
They stay in ``<report stem>_images/`` (FID reads them back, and a resumed run skips the samples it
has).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from fast3d.evaluation.clip_metrics import clip_r_precision, load_clip
from fast3d.evaluation.fid import FID, load_fid_backbone, min_reference_images
from fast3d.evaluation.report import Progress, SampleLog, write_report
from fast3d.evaluation.sets import iter_image_folder, list_images
from fast3d.io.images import composite, read_image


def _load(paths: list[str], what: str) -> torch.Tensor:  # -> [N, 3, H, W]
    imgs = [composite(read_image(p, name=what), 1.0) for p in paths]
    if len({tuple(i.shape) for i in imgs}) > 1:
        raise ValueError(f"{what}: the images of one sample differ in size: {[tuple(i.shape) for i in imgs]}")
    return torch.stack(imgs)


def images_dir(out_json: str) -> str:
    return (out_json[:-5] if out_json.endswith(".json") else out_json) + "_images"


def evaluate_generated(generate: Callable[[int, str | None, str | None, str], list[str]],
                       prompts: list[str] | None, out_json: str, *, model: str, data: str, kind: str, clips: list[str],
                       fid_backbone: str | None = None, reference: str | None = None,
                       images: list[str] | None = None, max_samples: int | None = None,
                       settings: dict | None = None, device: str | torch.device = "cpu") -> dict:
    """Generate for each prompt (and input image), score, and write the report.

    Args:
        generate: ``(index, prompt or None, input image path or None, output stem) -> [image paths]``.
        prompts: the prompt set (CLIP-R retrieves each sample's prompt among all of them; CLIP
            text similarity), or None for an image-conditioned generator without captions.
        out_json: the report (with ``.md`` and ``.rows.jsonl`` beside it; images in ``*_images/``).
        model, data, kind: what the report names as the model, the prompt set and the model kind.
        clips: CLIP backbones (local directories or ``random-tiny``); at least one.
        fid_backbone, reference: FID's feature extractor and reference folder (both or neither).
        images: input images (image-conditioned generators), paired with ``prompts`` where both
            are given: adds CLIP image similarity.
        max_samples: the first this many prompts only (the retrieval set stays all prompts).
        settings: generation settings that make a run different (a resumed run must match them).

    Returns:
        the report dict (see ``write_report``).
    """
    if not clips:
        raise ValueError("clips: name at least one CLIP backbone (a local directory, or random-tiny for tests)")
    if prompts is None and images is None:
        raise ValueError("give prompts, input images, or both")
    if prompts is not None and len(prompts) < 2:
        raise ValueError(f"prompts: CLIP-R precision retrieves among the prompt set; it needs at least 2 prompts, "
                         f"got {len(prompts)}")
    if images is not None and prompts is not None and len(images) != len(prompts):
        raise ValueError(f"images and prompts do not pair up: {len(images)} images for {len(prompts)} prompts")
    if (fid_backbone is None) != (reference is None):
        raise ValueError("FID needs both a backbone (--fid-backbone) and a reference folder (--reference); "
                         f"got backbone {fid_backbone!r}, reference {reference!r}")
    backbones = [load_clip(c, device) for c in clips]
    names = [c.name for c in backbones]
    if len(set(names)) != len(names):
        raise ValueError(f"clips: two backbones with one name: {names}")
    fid = None
    if reference is not None:
        fid = FID(load_fid_backbone(fid_backbone), device)
        need = min_reference_images(fid.backbone)
        have = len(list_images(reference))
        if have < need:
            raise ValueError(f"--reference {reference!r} has {have} images; FID with {fid.name} needs at least "
                             f"{need} (feature dimension + 1)")
    total = len(prompts if prompts is not None else images)
    n = total if max_samples is None else min(max_samples, total)
    texts = {c.name: c.embed_texts(prompts) for c in backbones} if prompts is not None else {}  # [P, D] each
    out_dir = images_dir(out_json)
    os.makedirs(out_dir, exist_ok=True)
    log = SampleLog(out_json, {"kind": kind, "model": os.path.abspath(model), "data": os.path.abspath(data),
                               "prompts": prompts, "images": images, "clips": names, **(settings or {})})
    progress = Progress(n, log.resumed)
    for i in range(n):
        key = f"p{i:05d}"
        if log.done(key):
            continue
        image = images[i] if images is not None else None
        prompt = prompts[i] if prompts is not None else None
        paths = generate(i, prompt, image, os.path.join(out_dir, key))
        if not paths:
            raise ValueError(f"the generator wrote no images for sample {i} ({prompt or image!r})")
        views = _load(paths, f"generated images of {key}")                      # [V, 3, H, W]
        row = {"key": key, **({"prompt": prompt} if prompt is not None else {}),
               **({"input": image} if image is not None else {}), "images": [os.path.basename(p) for p in paths]}
        inp = _load([image], f"images[{i}]") if image is not None else None      # [1, 3, H, W]
        for c in backbones:
            e = c.embed_images(views)                                           # [V, D]
            if prompts is not None:
                sim = e @ texts[c.name].T                                       # [V, P]
                truth = torch.full((len(views),), i)
                row[f"clip_r:{c.name}"] = float(clip_r_precision(sim, truth).mean())
                row[f"clip_text:{c.name}"] = float(sim[:, i].mean())
            if inp is not None:
                row[f"clip_image:{c.name}"] = float((e @ c.embed_images(inp).T).mean())
        log.add(row)
        progress.step(key, row)
    wanted = {f"p{i:05d}" for i in range(n)}
    rows = [r for r in log.rows if r["key"] in wanted]  # an earlier run may have gone further
    skipped: list = []
    set_metrics, bb = {}, {}
    for c in backbones:
        for m in (("clip_r", "clip_text") if prompts is not None else ()) + (("clip_image",) if images else ()):
            bb[f"{m}:{c.name}"] = c.name
    if fid is not None:
        for r in rows:
            fid.add(_load([os.path.join(out_dir, p) for p in r["images"]], f"generated images of {r['key']}"),
                    real=False)
        for batch in iter_image_folder(reference, skipped):
            fid.add(batch, real=True)
        set_metrics[f"fid:{fid.name}"] = fid.compute()
        bb[f"fid:{fid.name}"] = fid.name
    report = write_report(out_json, rows, model, data, backbones=bb, set_metrics=set_metrics, kind=kind,
                          prompts=len(prompts or ()), input_images=len(images or ()), generated_images=out_dir, reference=reference,
                          skipped=[{"path": p, "reason": why} for p, why in skipped],
                          **(settings or {}))
    return report
