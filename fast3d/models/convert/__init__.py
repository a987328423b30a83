"""Released checkpoints -> fast3d model directories (``fast3d convert KIND --weights W --out DIR``).

Kinds: ``lgm`` (3DTopia/LGM's released ``big`` model: model_fp16_fixrot.safetensors and
model_fp16.safetensors), ``openlrm`` (OpenLRM v1.1 small / base / large) and ``vfusion3d``
(VFusion3D's LRM), ``imagedream`` (ImageDream's diffusers-format pipeline: fast3d's MVDiffusion
with ImageDream's conditioning, the same computation) and ``era3d`` (Era3D's multi-view diffusion
pipeline, as an initialisation of fast3d's MVDiffusion: ``era3d`` says what does not carry over).
Every converter reads the checkpoint without unpickling
(``common.load_state_dict``), checks its keys and shapes against a manifest written down from the
original code (``manifest``, ``manifest_lrm``; a missing, extra or mis-shaped key is a ValueError
listing them), accounts for every source key (converted, or dropped with a reason, recorded in
the output's ``conversion.json``), loads the result strictly into the fast3d model and writes the
model directory atomically (``common.write_model_dir``).
"""

from __future__ import annotations

KINDS = ("lgm", "openlrm", "vfusion3d", "imagedream", "era3d")


def convert(kind: str, weights: str, out: str, variant: str | None = None, input_size: int | None = None,
            prompt: str | None = None, negative_prompt: str | None = None) -> dict:
    """Convert ``weights`` of model ``kind`` into the fast3d model directory ``out``.

    Args:
        kind: one of ``KINDS``.
        weights: the released checkpoint file, or a directory holding it (era3d, imagedream: the
            pipeline directory with unet/, vae/, image_encoder/, scheduler/; imagedream also
            text_encoder/ and tokenizer/).
        out: a new or empty directory.
        variant: lgm: "fixrot" | "prefix" (default: from the file name); openlrm: "small" | "base" |
            "large" (default: from the shapes); vfusion3d, imagedream, era3d: unused.
        input_size: lgm: LGM's Options.input_size (default 256, every release's).
        prompt, negative_prompt: imagedream: the text of its fixed text context (default: empty,
            as LGM runs it).

    Returns:
        The conversion record (also written to ``out/conversion.json``).
    """
    from fast3d.models.convert.common import check_out_dir, write_model_dir

    if kind not in KINDS:
        raise ValueError(f"KIND must be one of {list(KINDS)}; got {kind!r}")
    check_out_dir(out)                      # fail before reading gigabytes
    if input_size is not None and kind != "lgm":
        raise ValueError(f"--input-size applies to lgm only; got it for {kind}")
    if (prompt is not None or negative_prompt is not None) and kind != "imagedream":
        raise ValueError(f"--prompt / --negative-prompt apply to imagedream only; got them for {kind}")
    if kind == "lgm":
        from fast3d.models.convert import lgm

        model, record = lgm.convert(weights, variant, 256 if input_size is None else input_size)
    elif kind == "era3d":
        from fast3d.models.convert import era3d

        model, record = era3d.convert(weights, variant)
    elif kind == "imagedream":
        from fast3d.models.convert import imagedream

        model, record = imagedream.convert(weights, variant, prompt or "", negative_prompt or "")
    else:
        from fast3d.models.convert import lrm

        model, record = lrm.convert(kind, weights, variant)
    record["out"] = write_model_dir(model, out, record)
    return record
