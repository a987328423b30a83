"""Reading the parts of a released diffusers pipeline directory (Era3D's, ImageDream's): its
sub-directories, each part's weights file and JSON configs, old VAE key names, the scheduler's
training schedule."""

from __future__ import annotations

import json
import math
import os

from fast3d.models import checkpoints

# the weights file of a diffusers / transformers part, in the order their loaders prefer
PART_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
              "pytorch_model.bin")
# diffusers' AutoencoderKL attention names before 0.15 (Stable Diffusion 2.x's hub files were saved
# with them) -> today's
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; ValueError naming ``what`` if it cannot be read or is not an object."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: cannot read {path!r} ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what}: {path!r} holds a {type(d).__name__}, not a JSON object")
    return d


def pipeline_dirs(path: str, subdirs: tuple[str, ...], model: str, what: str = "--weights") -> dict[str, str]:
    """The ``subdirs`` (each with a ``config.json``) and ``scheduler/`` of ``model``'s diffusers
    pipeline directory ``path``."""
    if not isinstance(path, str) or not os.path.isdir(path):
        raise ValueError(f"{what} must be {model}'s pipeline directory (with {', '.join(s + '/' for s in subdirs)}); "
                         f"got {path!r}")
    dirs = {s: os.path.join(path, s) for s in (*subdirs, "scheduler")}
    missing = [s + "/" for s in subdirs if not os.path.isfile(os.path.join(dirs[s], "config.json"))]
    if missing:
        raise ValueError(f"{what} {path!r} is not {model}'s pipeline directory: no config.json in {missing}")
    return dirs


def part_weights(path: str) -> str:
    """A pipeline part's weights: the first of ``PART_FILES`` in ``path``, else its only weights
    file (``common.weights_file``)."""
    for name in PART_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return path


def vae_state(state: dict) -> tuple[dict, list[str]]:
    """A VAE state dict with the pre-0.15 attention names of its mid blocks renamed, and the old
    keys that were renamed."""
    out, renamed = {}, []
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) == 6 and parts[1:4] == ["mid_block", "attentions", "0"] and parts[4] in _OLD_VAE_ATTENTION:
            out[".".join(parts[:4] + [_OLD_VAE_ATTENTION[parts[4]], parts[5]])] = v
            renamed.append(k)
        else:
            out[k] = v
    return out, renamed


def load_frozen(module, state: dict, what: str, drop: tuple = ()) -> list[str]:
    """Load ``state`` strictly into ``module`` but for ``drop``ped non-persistent buffers that older
    libraries saved; the dropped keys present."""
    gone = [k for k in drop if k in state]
    checkpoints.load_state(module, {k: v.float() for k, v in state.items() if k not in gone}, what)
    return gone


def scheduler_settings(path: str, what: str) -> str:
    """The prediction type of the pipeline's ``scheduler/``; ValueError unless its training
    schedule is fast3d's ``NOISE_SCHEDULE`` (Stable Diffusion 2.x's)."""
    from fast3d.models.mvdiff import NOISE_SCHEDULE, PREDICTION_TYPES

    d = read_json(os.path.join(path, "scheduler_config.json"), what)
    got = {k: d.get(k) for k in NOISE_SCHEDULE}
    if got["beta_start"] is not None and got["beta_end"] is not None:
        same = (got["num_train_timesteps"] == NOISE_SCHEDULE["num_train_timesteps"]
                and got["beta_schedule"] == NOISE_SCHEDULE["beta_schedule"]
                and math.isclose(got["beta_start"], NOISE_SCHEDULE["beta_start"])
                and math.isclose(got["beta_end"], NOISE_SCHEDULE["beta_end"]))
    else:
        same = False
    pred = d.get("prediction_type", "epsilon")
    if not same or pred not in PREDICTION_TYPES:
        raise ValueError(f"{what}: the scheduler {got} (prediction_type {pred!r}) is not Stable Diffusion 2.x's "
                         f"{NOISE_SCHEDULE} with one of {list(PREDICTION_TYPES)}, which fast3d samples with")
    return pred


def load_vae_and_image_encoder(dirs: dict, encoder_cls, weights: str) -> tuple:  # -> vae, encoder, vae record, encoder record
    """The pipeline's ``vae/`` (a diffusers ``AutoencoderKL``, old attention names renamed) and
    ``image_encoder/`` (``encoder_cls``, a transformers CLIP vision model), built from their
    configs and loaded strictly from their weights without unpickling; each part's record (file,
    sha256; ``renamed`` VAE keys, ``dropped`` non-persistent encoder buffers)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig

    from fast3d.models.convert.common import load_state_dict

    try:
        vae = AutoencoderKL.from_config({k: v for k, v in read_json(os.path.join(dirs["vae"], "config.json"),
                                                                    "--weights vae/").items()
                                         if not k.startswith("_")})
        encoder = encoder_cls(CLIPVisionConfig.from_dict(read_json(os.path.join(dirs["image_encoder"], "config.json"),
                                                                   "--weights image_encoder/")))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"--weights {weights!r}: vae/ or image_encoder/ config.json is not a diffusers "
                         f"AutoencoderKL / transformers CLIPVisionConfig ({e})") from None
    vstate, vrec = load_state_dict(part_weights(dirs["vae"]), "--weights vae/")
    vstate, vrec["renamed"] = vae_state(vstate)
    load_frozen(vae, vstate, dirs["vae"])
    estate, erec = load_state_dict(part_weights(dirs["image_encoder"]), "--weights image_encoder/")
    erec["dropped"] = load_frozen(encoder, estate, dirs["image_encoder"], drop=("vision_model.embeddings.position_ids",))
    return vae, encoder, vrec, erec
