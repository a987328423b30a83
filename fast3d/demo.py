"""``fast3d demo``: the end-to-end proof, from nothing to a trained image-to-3D model.

1. generate a procedural multi-view dataset (train) and a held-out one (other objects);
2. evaluate the untrained tiny LGM on the held-out objects;
3. train it with DeepSpeed (2 CPU ranks, or every GPU);
4. evaluate again (held-out PSNR must rise clearly: the command fails otherwise);
5. reconstruct a held-out object from its 4 input views: a 3DGS PLY and a turntable GIF;
6. plot the loss curve, and print where everything is.

Every stage resumes: a rerun after a kill keeps the finished data and continues training from the
newest checkpoint. On a CPU machine it runs in a few minutes; on a GPU it uses bigger defaults.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

MIN_PSNR_GAIN_DB = 1.0


def defaults(gpu: bool) -> dict:
    if gpu:
        return dict(train_objects=512, eval_objects=16, resolution=128, gaussians=8000, steps=2000,
                    ranks=torch.cuda.device_count())
    return dict(train_objects=64, eval_objects=8, resolution=64, gaussians=4000, steps=300, ranks=2)


def find_config(path: str) -> str:
    """``path`` as given, or relative to the checkout fast3d is installed from (editable install)."""
    if os.path.isfile(path):
        return os.path.abspath(path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    alt = os.path.join(root, path)
    if os.path.isfile(alt):
        return alt
    raise ValueError(f"--config {path!r} not found (looked in {os.getcwd()} and {root})")


def _say(msg: str) -> None:
    print(f"[fast3d demo] {msg}", file=sys.stderr, flush=True)


def _datagen(out: str, n: int, seed: int, o: dict) -> None:
    from fast3d.datagen import procedural

    cfg = procedural.ProceduralConfig(num_objects=n, views=16, rig="orbit16", resolution=o["resolution"], seed=seed,
                                      gaussians_per_object=o["gaussians"], samples_per_shard=4, batch_size=4)
    procedural.run(out, cfg)


def _plot(metrics: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in metrics]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [r["loss"] for r in metrics])
    ax[0].set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    ax[1].plot(steps, [r["psnr"] for r in metrics])
    ax[1].set(xlabel="step", ylabel="PSNR (dB)", title="training-view PSNR")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: str, config: str = "train/configs/lgm_tiny.yaml", steps: int | None = None, ranks: int | None = None,
        train_objects: int | None = None, seed: int = 0) -> dict:
    import yaml

    from fast3d.inference import lgm as lgm_infer
    from fast3d.inference.common import save_image
    from fast3d.models.checkpoints import resolve_checkpoint
    from fast3d.training import launch
    from fast3d.training.config import load_config
    from fast3d.training.metrics import read_metrics
    from fast3d.training.recipes.lgm import LGMRecipe

    t0 = time.perf_counter()
    base = load_config(find_config(config), recipe="lgm")  # a bad config fails before any work
    o = defaults(torch.cuda.is_available())
    o.update({k: v for k, v in dict(steps=steps, ranks=ranks, train_objects=train_objects).items() if v is not None})
    out = os.path.abspath(out)
    data_train, data_eval = os.path.join(out, "data", "train"), os.path.join(out, "data", "eval")
    _say(f"1/6 procedural data: {o['train_objects']} training + {o['eval_objects']} held-out objects, 16 views, "
         f"{o['resolution']} px -> {os.path.join(out, 'data')}")
    _datagen(data_train, o["train_objects"], seed, o)
    _datagen(data_eval, o["eval_objects"], seed + 1_000_003, o)

    cfg_dict = base.to_dict()
    cfg_dict.pop("source")
    cfg_dict.update(max_steps=o["steps"], seed=seed, deepspeed=base.path(base.deepspeed),
                    ckpt_every=max(1, o["steps"] // 3))
    cfg_dict["data"] = dict(cfg_dict["data"], train=data_train)
    run_cfg = os.path.join(out, "lgm_demo.yaml")
    os.makedirs(out, exist_ok=True)
    with open(run_cfg, "w") as f:
        yaml.safe_dump(cfg_dict, f, sort_keys=False)
    cfg = load_config(run_cfg, recipe="lgm")
    backbone = cfg.loss.get("lpips_backbone", "imagenet")

    _say("2/6 evaluating the untrained model on the held-out objects")
    init_dir = os.path.join(out, "init_model")
    torch.manual_seed(cfg.seed)
    LGMRecipe(cfg).build_model().save_pretrained(init_dir)  # the weights training starts from
    before = lgm_infer.evaluate(init_dir, data_eval, os.path.join(out, "eval_before.json"),
                                lpips_backbone=backbone)["mean"]

    run_dir = os.path.join(out, "run")
    resume = os.path.isfile(os.path.join(run_dir, "checkpoints", "latest"))
    _say(f"3/6 training the tiny LGM for {o['steps']} steps on {o['ranks']} rank(s) with DeepSpeed"
         + (" (resuming)" if resume else "") + f" -> {run_dir}")
    rc = launch.run("lgm", run_cfg, run_dir, resume=resume, ranks=o["ranks"])
    if rc != 0:
        raise RuntimeError(f"training exited with code {rc}; rerun `fast3d demo` to resume it")

    _say("4/6 evaluating the trained model")
    model_dir = resolve_checkpoint(run_dir)
    after = lgm_infer.evaluate(model_dir, data_eval, os.path.join(out, "eval_after.json"),
                               lpips_backbone=backbone)["mean"]

    _say("5/6 reconstructing a held-out object from its 4 input views")
    from fast3d.data.dataset import MultiViewDataset

    sample = next(iter(MultiViewDataset(data_eval, views=16, resolution=o["resolution"])))
    inputs_dir = os.path.join(out, "heldout_inputs")
    os.makedirs(inputs_dir, exist_ok=True)
    idx = list(cfg.data.get("input_views", (0, 4, 8, 12)))
    paths = []
    for i in idx:
        paths.append(os.path.join(inputs_dir, f"view{i:02d}.png"))
        save_image(sample["images"][i], paths[-1])
    cams = os.path.join(inputs_dir, "cameras.json")
    with open(cams, "w") as f:
        json.dump({"viewmats": sample["viewmats"][idx].tolist(), "Ks": sample["Ks"][idx].tolist()}, f)
    inf = lgm_infer.infer(model_dir, paths, os.path.join(out, "reconstruction"), cameras_json=cams)

    _say("6/6 loss curve")
    curve = os.path.join(out, "loss_curve.png")
    _plot(read_metrics(run_dir), curve)

    gain = after["psnr"] - before["psnr"]
    summary = {"psnr_before": before["psnr"], "psnr_after": after["psnr"], "psnr_gain": gain,
               "ssim_before": before["ssim"], "ssim_after": after["ssim"],
               "chamfer_before": before.get("chamfer"), "chamfer_after": after.get("chamfer"),
               "seconds": time.perf_counter() - t0, "out": out}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"""
fast3d demo finished in {summary['seconds']:.0f} s
  held-out PSNR   {before['psnr']:.2f} dB -> {after['psnr']:.2f} dB ({gain:+.2f} dB)
  held-out SSIM   {before['ssim']:.3f} -> {after['ssim']:.3f}
  Chamfer         {before.get('chamfer', float('nan')):.4f} -> {after.get('chamfer', float('nan')):.4f}
  data            {os.path.join(out, 'data')}
  training run    {run_dir} (metrics.jsonl, tensorboard/, checkpoints/)
  trained model   {model_dir}
  evaluation      {os.path.join(out, 'eval_before.json')}, {os.path.join(out, 'eval_after.json')}
  reconstruction  {inf['ply']}
  turntable       {inf['turntable']}
  loss curve      {curve}""")
    if gain < MIN_PSNR_GAIN_DB:
        raise RuntimeError(f"held-out PSNR rose by {gain:.2f} dB, less than the {MIN_PSNR_GAIN_DB} dB the demo "
                           f"requires: training did not work")
    return summary
