"""The MV-LLaVA instruction-tuning recipe: exactly Bootstrap3D's parameters train (projector,
language model, the vision tower's last N layers), the answers alone are the targets, and bad
records are named; a killed run resumes to the uninterrupted end state."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import train_killed_after_checkpoint

from fast3d.datagen import mvllm, procedural
from fast3d.training.config import run_config_from_dict
from fast3d.training.metrics import read_metrics
from fast3d.training.recipes.mvllm import IGNORE, MVLLMRecipe, read_annotations

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "train", "configs")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mvllm_data")
    shards = str(out / "train")
    procedural.run(shards, procedural.ProceduralConfig(num_objects=6, views=16, rig="orbit16", resolution=16,
                                                       gaussians_per_object=200, samples_per_shard=3, batch_size=6,
                                                       save_ply=False))
    ann = out / "annotations.jsonl"
    with open(ann, "w") as f:   # object captions as the descriptions; every score 1..5 appears
        for i in range(5):
            f.write(json.dumps({"key": f"obj{i:08d}", "description": f"object number {i}", "score": i + 1,
                                "reasoning": "Sharp views."}) + "\n")
    return shards, str(ann)


def config(data, tmp_path, **kw):
    shards, ann = data
    d = dict(recipe="mvllm", deepspeed=os.path.join(CONFIGS, "ds_zero2.json"), precision="fp32", batch_size=2,
             max_steps=2, lr=1e-2, weight_decay=0.0, warmup_steps=0, log_every=1, ckpt_every=2,
             model={"pretrained": "random-tiny", "vision_layers": 2},
             data={"train": shards, "annotations": ann, "views": 16, "resolution": 16,
                   "prompts": os.path.join(CONFIGS, "mvllm_prompts.yaml"), "max_length": 1024})
    d.update(kw)
    p = tmp_path / "mvllm.yaml"
    p.write_text(json.dumps(d))
    return str(p), d


def test_collate_targets_only_the_two_answers(data, tmp_path):
    _, d = config(data, tmp_path)
    r = MVLLMRecipe(run_config_from_dict(d))
    r.build_model()
    samples = list(r.dataset(0, 1))
    assert sorted(s["key"] for s in samples) == [f"obj{i:08d}" for i in range(5)]   # obj5 has no record
    b = r.collate(samples[:2])
    tok = r.processor.tokenizer
    for i, s in enumerate(samples[:2]):
        lab = b["labels"][i]
        text = tok.decode(lab[lab != IGNORE])
        assert text == f" {s['description']}</s> Sharp views. Score: {s['score']}</s>"
        assert (b["input_ids"][i] == r.processor.image_token_id).sum() == 16    # (32 / 8)^2 patches
        assert not (lab == r.processor.image_token_id).any()
    assert b["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_bootstrap3d_parameters_train_and_nothing_else(data, tmp_path):
    cfg, _ = config(data, tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fast3d.cli", "train", "mvllm", "--config", cfg, "--output", str(out), "--ranks", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    model_dir = out / "checkpoints" / "step00000002" / "model"
    trained = mvllm.load_llava(str(model_dir))[0].state_dict()   # transformers maps its saved names back
    init, _ = mvllm.tiny_llava()
    before = init.state_dict()
    changed = {k for k, v in trained.items() if not torch.equal(v, before[k])}
    n_layers = len(init.model.vision_tower.encoder.layers)
    want = {k for k in before if k.startswith(("model.multi_modal_projector.", "model.language_model.", "lm_head."))
            or any(k.startswith(f"model.vision_tower.encoder.layers.{i}.") for i in range(n_layers - 2, n_layers))}
    assert changed == want, (sorted(changed - want)[:5], sorted(want - changed)[:5])
    # The export is a directory the pipeline stage loads.
    stage = mvllm.MVLLMFilter(str(model_dir), os.path.join(CONFIGS, "mvllm_prompts.yaml"), max_new_tokens=4)
    keep, score, captions = stage(torch.rand(1, 16, 3, 16, 16))
    assert keep.shape == score.shape == (1,) and len(captions) == 1


def _train_cmd(cfg, out, *extra):
    return [sys.executable, "-m", "fast3d.cli", "train", "mvllm", "--config", cfg, "--output", str(out), "--ranks", "1",
            *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_end_state(data, tmp_path):
    """Killed after its step-2 checkpoint and resumed (mid-epoch 1: 5 records, batch 2), a run logs the
    uninterrupted run's losses and learning rates bitwise and exports the same weights (fp32)."""
    cfg, _ = config(data, tmp_path, max_steps=4, ckpt_every=2, warmup_steps=1, lr=1e-3)
    p = subprocess.run(_train_cmd(cfg, tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    train_killed_after_checkpoint(_train_cmd(cfg, tmp_path / "killed"), tmp_path / "killed", 2, timeout=600)
    assert not (tmp_path / "killed" / "checkpoints" / "step00000004").exists()
    p = subprocess.run(_train_cmd(cfg, tmp_path / "killed", "--resume"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    keys = ("step", "loss", "answer_tokens", "lr", "epoch")
    whole, resumed = ([{k: r[k] for k in keys} for r in read_metrics(str(tmp_path / run))] for run in ("whole", "killed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed == whole
    a, b = (mvllm.load_llava(str(tmp_path / run / "checkpoints" / "step00000004" / "model"))[0].state_dict()
            for run in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("line,match", [
    ('{"key": "a", "description": "x", "score": 6}', r"score must be an int in \[1, 5\]"),
    ('{"key": "a", "description": "x", "score": 4.0}', "score must be an int"),
    ('{"key": "a", "description": "", "score": 4}', "description must be a non-empty string"),
    ('{"key": "a", "description": "x", "score": 4, "extra": 1}', r"unknown fields \['extra'\]"),
    ('not json', "not JSON"),
])
def test_bad_annotation_records_are_named_with_their_line(tmp_path, line, match):
    p = tmp_path / "a.jsonl"
    p.write_text('{"key": "ok", "description": "fine", "score": 3}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"a.jsonl:2: {match}"):
        read_annotations(str(p))


def test_bad_sections_are_named(data, tmp_path):
    _, d = config(data, tmp_path)
    with pytest.raises(ValueError, match=r"model.vision_layers must be in \[0, 4\]"):
        MVLLMRecipe(run_config_from_dict({**d, "model": {"vision_layers": 5}})).build_model()
    with pytest.raises(ValueError, match="data.picks"):
        MVLLMRecipe(run_config_from_dict({**d, "data": {**d["data"], "picks": [0, 4, 8, 16]}}))
    with pytest.raises(ValueError, match="model.pretrained must be 'random-tiny' or a local LLaVA"):
        MVLLMRecipe(run_config_from_dict({**d, "model": {"pretrained": str(tmp_path / "none")}}))
