"""`fast3d datagen pipeline` on tiny random models (real diffusers / transformers classes, real calls):
the shards read back as synthetic samples with the orbit cameras, the filter's scores and the
recaptions; reruns write nothing, a deleted shard comes back byte-identical, another split of the
work writes the same bytes; bad configs and foreign output directories fail before any work; item
prompts and seeds are a pure function of (seed, i)."""

import math
import os

import pytest
import torch
import yaml
from helpers import assert_close

from fast3d.data import MultiViewDataset
from fast3d.datagen.pipeline import PipelineConfig, build_stages, engine, generate, item, load_config, orbit, run_config
from fast3d.datagen.quality import QualityFilter

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")

# Tolerances of this module, each with its reason.
TOL = {
    # alpha is stored as an 8-bit PNG: the read-back is within half a level of the float alpha
    "alpha_png": dict(atol=0.5 / 255 + 1e-6, rtol=0),
    # viewmats are stored as JSON float32 and rebuilt in float64 from the elevation: last bits
    "viewmats": dict(atol=1e-6, rtol=0),
    # the camera centre's elevation recomputed with asin from float32 viewmats
    "elevation": dict(atol=1e-5, rtol=0),
    # the pipeline scores a batch of samples, the test one sample: the float32 features round
    # differently by batch shape, and the score is a small sum of larger terms (w . f + b, cancelling);
    # measured |diff| 1.7e-4 at a score of -0.034 in a full-suite run (threads differ from a lone run)
    "quality": dict(atol=1e-3, rtol=1e-3),
}


def tiny(seed, **sections) -> dict:
    d = dict(seed=seed, device="cpu",
             prompts=dict(templates=["a {color} {object}", "a {object} of {material}"],
                          vocab=dict(color=["red", "blue", "green"], object=["chair", "mug", "lamp"],
                                     material=["wood", "metal"]), count=3),
             t2i=dict(model="random-tiny", steps=2, resolution=32, batch_size=2),
             mv=dict(model="random-tiny", views=4, resolution=16, steps=2, elevation_deg=12.0),
             shards=dict(samples_per_shard=2))
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


def read(out, views=4, resolution=16):
    return {s["key"]: s for s in MultiViewDataset(out, views=views, resolution=resolution)}


def shard_bytes(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(out, cfg, stages): a dataset without filter and recaption, its stages kept for reruns (a fixed
    seed: the module-wide fixture cannot take the per-test `seed`)."""
    cfg = PipelineConfig.from_dict(tiny(7))
    stages = build_stages(cfg, torch.device("cpu"))
    out = str(tmp_path_factory.mktemp("plain"))
    counts = generate(out, cfg, progress=False, stages=stages)
    assert counts["shards_written"] == 2 and counts["samples"] == 3 and counts["kept"] == 3
    return out, cfg, stages


def test_plain_shards_read_back(plain):
    out, cfg, _ = plain
    samples = read(out)
    assert sorted(samples) == ["syn00000000", "syn00000001", "syn00000002"]
    rig = orbit(cfg)
    for i, (_key, s) in enumerate(sorted(samples.items())):
        assert s["source"] == "synthetic" and s["quality"] == 1.0
        assert s["caption"] == item(cfg, i)[0]
        assert s["images"].shape == (4, 3, 16, 16) and bool((s["alphas"] == 1).all())
        assert s["elevation"] == pytest.approx(math.radians(12.0))
        assert_close(s["viewmats"], rig.viewmats, atol=1e-6, rtol=0, name="viewmats")
    centres = -(rig.viewmats[:, :3, :3].transpose(1, 2) @ rig.viewmats[:, :3, 3:])[..., 0]   # [V, 3]
    assert_close(centres.norm(dim=-1), torch.full((4,), cfg.mv.distance), atol=1e-5, rtol=0, name="distance")
    azimuths = torch.atan2(centres[:, 1], centres[:, 0]) % (2 * math.pi)
    assert_close(azimuths, torch.arange(4) * (math.pi / 2), atol=1e-5, rtol=0, name="azimuths")
    assert len({s["images"].sum().item() for s in samples.values()}) == 3  # the items differ


def test_rerun_and_resume_are_exact(plain, tmp_path):
    out, cfg, stages = plain
    before = shard_bytes(out)
    counts = generate(out, cfg, progress=False, stages=stages)
    assert counts["shards_written"] == 0 and counts["shards_skipped"] == 2 and shard_bytes(out) == before
    # a killed run: one shard missing, a temporary file left behind
    os.unlink(os.path.join(out, "synthetic-000001.tar"))
    open(os.path.join(out, ".synthetic-000001.tar.tmp99999"), "wb").write(b"half a shard")
    counts = generate(out, cfg, progress=False, stages=stages)
    assert counts["shards_written"] == 1 and counts["samples"] == 1
    assert shard_bytes(out) == before
    assert sorted(os.listdir(out)) == ["dataset.json", "synthetic-000000.tar", "synthetic-000001.tar"]
    # another split of the work (2 readers, in either order) writes the same bytes
    split = str(tmp_path / "split")
    assert generate(split, cfg, reader=1, readers=2, progress=False, stages=stages)["shards_written"] == 1
    assert generate(split, cfg, reader=0, readers=2, progress=False, stages=stages)["shards_written"] == 1
    assert shard_bytes(split) == before


def test_samples_the_filter_cannot_score_are_counted(plain, tmp_path, capsys, gen):
    """A filter's NaN score (the MV-LLM's answer had no parsable grade) is a rejection counted in the
    returned counts and on the progress bar, apart from the low scores."""
    _, cfg, stages = plain
    scores = torch.rand(3, generator=gen, dtype=torch.float64)
    scores[int(torch.randint(3, (), generator=gen))] = math.nan
    low = int(torch.randint(3, (), generator=gen))

    done = [0]   # items scored so far: the shards come in order, items 0, 1 | 2

    def scripted(views):                                       # [N, V, 3, R, R] -> keep [N], score [N]
        index = torch.arange(done[0], done[0] + len(views))
        done[0] += len(views)
        return ~scores[index].isnan() & (index != low), scores[index]

    counts = generate(str(tmp_path / "out"), cfg, progress=True,
                      stages=engine.Stages(**{**vars(stages), "filter": scripted}))
    unscored = int(scores.isnan().sum())
    rejected = len({low} | {i for i in range(3) if math.isnan(scores[i])})
    assert counts["rejected_unscored"] == unscored == 1
    assert counts["rejected"] == rejected and counts["kept"] == 3 - rejected
    assert f"rejected={rejected}, unscored=1" in capsys.readouterr().err
    assert {s["quality"] for s in read(str(tmp_path / "out")).values()} <= set(scores.tolist())


def test_full_pipeline_with_filter_and_recaption(tmp_path, seed, gen):
    filter_dir = str(tmp_path / "filter")
    feats = torch.randn(20, 32, generator=gen, dtype=torch.float64)  # random-tiny DINOv2 is 32 wide
    QualityFilter(dinov2="random-tiny", frames=4).fit(feats, (torch.arange(20) % 2).long()).save(filter_dir)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(seed, filter=dict(dir=filter_dir, threshold=-1e9),
                                          recaption=dict(model="random-tiny", max_tokens=5))))
    out = str(tmp_path / "out")
    (counts,) = run_config(str(config), out)
    assert counts["kept"] == 3 and counts["rejected"] == 0 and counts["shards_written"] == 2
    samples = read(out)
    cfg = load_config(str(config))
    stages = build_stages(cfg, torch.device("cpu"))
    for i, (key, s) in enumerate(sorted(samples.items())):
        prompt, t2i_seed, mv_seed = item(cfg, i)
        views = stages.mv(stages.t2i([prompt], [t2i_seed]), [mv_seed])                     # [1, V, 3, R, R]
        _, score = stages.filter(views)
        assert s["source"] == "synthetic"
        assert_close(torch.tensor(s["quality"]), score[0], **TOL["quality"], name=f"{key} quality")
        assert s["caption"] == (stages.recaption(views[:, 0])[0] or prompt)
    # a filter that rejects everything: empty shards, still done on a rerun
    cfg = PipelineConfig.from_dict(tiny(seed, filter=dict(dir=filter_dir, threshold=1e9)))
    none = str(tmp_path / "none")
    counts = generate(none, cfg, progress=False)
    assert counts["kept"] == 0 and counts["rejected"] == 3 and counts["shards_written"] == 2
    assert generate(none, cfg, progress=False)["shards_written"] == 0


def no_work(*args, **kwargs):
    raise AssertionError("models were loaded before the configuration was checked")


@pytest.mark.parametrize("change, match", [
    (dict(colour=1), r"pipeline config: unknown keys \['colour'\]"),
    (dict(t2i=dict(step=3)), r"pipeline config 't2i': unknown keys \['step'\]"),
    (dict(t2i=dict(model="/nonexistent/pixart")), r"t2i.model must be 'random-tiny' or a local model directory; "
                                                  r"got '/nonexistent/pixart'"),
    (dict(mv=dict(model="/nonexistent/sv3d")), r"mv.model .* got '/nonexistent/sv3d'"),
    (dict(recaption=dict(model="/nonexistent/blip")), r"recaption.model .* got '/nonexistent/blip'"),
    (dict(filter=dict(dir="/nonexistent/filter")), r"filter.dir must be null or a directory .* '/nonexistent/filter'"),
    (dict(mv=dict(views=0)), r"mv.views must be an int >= 1; got 0"),
    (dict(prompts=dict(templates=["a {shape}"])), r"slot \{shape\} in 'a \{shape\}' has no prompts.vocab list"),
    (dict(prompts=dict(count=None)), r"prompts.count is required"),
    (dict(prompts=dict(file="/nonexistent/prompts.txt")), r"give either file or templates"),
])
def test_bad_config_fails_before_work(tmp_path, monkeypatch, change, match):
    monkeypatch.setattr(engine, "build_stages", no_work)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(0, **change)))
    with pytest.raises(ValueError, match=match):
        run_config(str(config), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_foreign_output_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "build_stages", no_work)
    out = tmp_path / "out"
    cfg = PipelineConfig.from_dict(tiny(0, prompts=dict(count=2)))
    engine.prepare_output(str(out), cfg)  # the manifest of a 2-item dataset
    with pytest.raises(ValueError, match=r"holds another dataset"):
        generate(str(out), PipelineConfig.from_dict(tiny(1)), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "procedural-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not empty and holds no dataset.json"):
        generate(str(other), cfg, progress=False)
    assert sorted(os.listdir(out)) == ["dataset.json"]


def test_prompts_are_a_pure_function_of_seed_and_index(tmp_path, seed):
    small = PipelineConfig.from_dict(tiny(seed, prompts=dict(count=5)))
    large = PipelineConfig.from_dict(tiny(seed, prompts=dict(count=500)))
    items = [item(large, i) for i in range(500)]
    assert [item(small, i) for i in range(5)] == items[:5] == [item(large, i) for i in range(5)]
    prompts = {p for p, _, _ in items}
    words = {"red", "blue", "green", "chair", "mug", "lamp", "wood", "metal"}
    for p in prompts:
        assert set(p.split()) - {"a", "of"} <= words
    assert len(prompts) == 3 * 3 + 3 * 2  # every combination of both templates appears
    assert len({s for _, s, _ in items}) == 500 and len({s for _, _, s in items}) == 500
    other = PipelineConfig.from_dict(tiny(seed + 1, prompts=dict(count=500)))
    assert [item(other, i) for i in range(500)] != items
    lines = tmp_path / "prompts.txt"
    lines.write_text("a chair\n\n  a teapot  \na fox\n")
    d = tiny(seed)
    d["prompts"] = dict(file=str(lines), count=2)
    cfg = PipelineConfig.from_dict(d)
    assert cfg.num_items == 2 and [item(cfg, i)[0] for i in range(2)] == ["a chair", "a teapot"]


def test_example_configs():
    cfg = load_config(os.path.join(CONFIGS, "datagen_pipeline_tiny.yaml"))
    assert cfg.t2i.model == "random-tiny" and cfg.num_items == 8
    with open(os.path.join(CONFIGS, "datagen_pipeline.yaml")) as f:
        real = yaml.safe_load(f)
    real["prompts"] = tiny(0)["prompts"]  # the file of prompts is not here either
    with pytest.raises(ValueError, match=r"t2i.model .* got '/models/PixArt-XL-2-512x512'"):
        PipelineConfig.from_dict(real)


FAKE_MODELS = """
import torch


class FakeMultiView:
    # views [N, V, 3, R, R]: the image, then frames of noise drawn from the item's seed
    @classmethod
    def from_config(cls, cfg, device):
        return cls(cfg.mv.views, cfg.mv.resolution)

    def __init__(self, views, resolution):
        self.views, self.resolution = views, resolution

    def __call__(self, images, seeds):
        out = []
        for image, seed in zip(images, seeds):
            g = torch.Generator().manual_seed(int(seed))
            first = torch.nn.functional.interpolate(image[None], size=(self.resolution,) * 2, mode="bilinear")
            rest = torch.rand(self.views - 1, 3, self.resolution, self.resolution, generator=g)
            out.append(torch.cat([first, rest]))
        return torch.stack(out)


class FakeTextToImage:
    def __init__(self, model, resolution, steps, guidance, device):
        self.resolution = resolution

    def __call__(self, prompts, seeds):
        return torch.stack([torch.rand(3, self.resolution, self.resolution,
                                       generator=torch.Generator().manual_seed(int(s))) for s in seeds])
"""


@pytest.fixture
def fake_models(tmp_path, monkeypatch):
    """Stand-ins for the two diffusion models (seconds each on the CPU), so that tests of the later
    stages run build_stages and generate in well under a second per sample."""
    from fast3d.datagen.pipeline import stages as st

    (tmp_path / "fake_models.py").write_text(FAKE_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_models

    monkeypatch.setitem(st.STAGE_KINDS["mv"], "svd", "fake_models:FakeMultiView")
    monkeypatch.setattr(st, "TextToImage", fake_models.FakeTextToImage)


def regenerate(cfg, stages, i):
    """Item i's generated views [1, V, 3, R, R], recomputed with the run's stages."""
    prompt, t2i_seed, mv_seed = item(cfg, i)
    return stages.mv(stages.t2i([prompt], [t2i_seed]), [mv_seed])


def test_matting_writes_real_alpha(tmp_path, seed, fake_models):
    """Defect: generated views were stored with alpha 1, so the LRM's opacity loss taught full opacity.
    With a matting model the stored alpha is the model's foreground probability of each view."""
    from fast3d.datagen.matting import Matting

    cfg = PipelineConfig.from_dict(tiny(seed, matting=dict(model="random-tiny", resolution=32)))
    stages = build_stages(cfg, torch.device("cpu"))
    assert isinstance(stages.matting, Matting)
    out = str(tmp_path / "out")
    assert generate(out, cfg, progress=False)["kept"] == 3
    for i, (key, s) in enumerate(sorted(read(out).items())):
        alphas = stages.matting(regenerate(cfg, stages, i))[0]                        # [V, 1, R, R]
        assert_close(s["alphas"], alphas, **TOL["alpha_png"], name=f"{key} alpha")
        assert float(s["alphas"].min()) < 0.9, "a matted sample must not be opaque everywhere"
        assert float(s["alphas"].std()) > 0, "the alpha must depend on the pixel"


def test_elevation_estimator_labels_each_sample_and_its_cameras(tmp_path, seed, gen, fake_models):
    """Defect: the elevation estimator was trained but never used; every sample carried the
    configured elevation. With one, each sample's elevation is the estimator's prediction on its
    views, and its cameras orbit at that elevation."""
    from fast3d import cameras
    from fast3d.datagen.quality import ElevationEstimator, FeatureExtractor

    est = ElevationEstimator(32, hidden=8, dinov2="random-tiny")
    with torch.no_grad():
        for p in est.mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        est.mlp[2].bias.fill_(0.4)
    est.save(str(tmp_path / "est"))
    cfg = PipelineConfig.from_dict(tiny(seed, elevation=dict(estimator=str(tmp_path / "est"))))
    out = str(tmp_path / "out")
    generate(out, cfg, progress=False)
    stages = build_stages(cfg, torch.device("cpu"))
    ext = FeatureExtractor.load("random-tiny")
    elevations = []
    for i, (key, s) in enumerate(sorted(read(out).items())):
        views = regenerate(cfg, stages, i)                                        # [1, 4, 3, R, R]: all 4 views
        want = float(est.predict(ext.features(views))[0])                         # the mean over 4 uniform views
        assert s["elevation"] == pytest.approx(want, abs=1e-6), key
        centres = cameras.camera_centers(s["viewmats"].double())                  # [V, 3]
        el = torch.asin(centres[:, 2] / centres.norm(dim=-1))
        assert_close(el, torch.full((4,), want, dtype=torch.float64), **TOL["elevation"], name=f"{key} elevation")
        assert_close(s["viewmats"], orbit(cfg, want).viewmats, **TOL["viewmats"], name=f"{key} viewmats")
        elevations.append(want)
    assert len(set(elevations)) == 3 and all(abs(e - math.radians(12.0)) > 1e-3 for e in elevations)


PLUGIN = """
import torch

CHECKED = []


class Describe:
    @staticmethod
    def check_config(cfg):
        CHECKED.append(dict(cfg.filter.options))

    @classmethod
    def from_config(cls, cfg, device):
        cut = cfg.filter.options["keep_below"]
        return lambda views: (torch.arange(len(views)) < cut, torch.arange(len(views)).double() + 4,
                              [f"object {k}" if k else "" for k in range(len(views))])
"""


def test_stage_registry_plugs_in_a_filter_that_captions(tmp_path, monkeypatch, fake_models):
    """A filter kind added with one registry line: its options reach check_config and from_config,
    its captions replace the prompts (an empty one keeps the prompt), its score is the quality."""
    from fast3d.datagen.pipeline import stages as st

    (tmp_path / "my_filter.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(st.STAGE_KINDS["filter"], "describe", "my_filter:Describe")
    import my_filter

    cfg = PipelineConfig.from_dict(tiny(5, filter=dict(kind="describe", options=dict(keep_below=2)),
                                        shards=dict(samples_per_shard=3)))
    assert my_filter.CHECKED == [{"keep_below": 2}]
    out = str(tmp_path / "out")
    counts = generate(out, cfg, progress=False)
    assert counts["kept"] == 2 and counts["rejected"] == 1
    samples = read(out)
    assert sorted(samples) == ["syn00000000", "syn00000001"]
    assert samples["syn00000000"]["caption"] == item(cfg, 0)[0] and samples["syn00000000"]["quality"] == 4.0
    assert samples["syn00000001"]["caption"] == "object 1" and samples["syn00000001"]["quality"] == 5.0


@pytest.mark.parametrize("change, match", [
    (dict(filter=dict(kind="nonesuch")), r"filter.kind must be one of \[.*'svm'.*\]; got 'nonesuch'"),
    (dict(filter=dict(options=dict(x=1))), r"filter.options: the 'svm' filter stage takes no options"),
    (dict(matting=dict(model="/nonexistent/u2net")), r"matting.model must be null, .* '/nonexistent/u2net'"),
    (dict(matting=dict(resolution=0)), r"matting.resolution must be an int >= 1"),
    (dict(elevation=dict(estimator="/nonexistent/est")), r"elevation.estimator must be null or a directory"),
])
def test_bad_stage_sections_fail_before_work(tmp_path, monkeypatch, change, match):
    monkeypatch.setattr(engine, "build_stages", no_work)
    with pytest.raises(ValueError, match=match):
        PipelineConfig.from_dict(tiny(0, **change))


def test_prompts_from_a_local_llm(tmp_path, fake_models):
    """prompts.llm: the pipeline first writes the LM's prompts (datagen prompts) and its items take them."""
    d = tiny(0)
    d["prompts"] = dict(llm=dict(model="random-tiny", count=3, per_call=3, max_new_tokens=5, seed=2,
                                 out=str(tmp_path / "prompts.txt")))
    cfg = PipelineConfig.from_dict(d)
    assert cfg.num_items == 3
    out = str(tmp_path / "out")
    assert generate(out, cfg, progress=False)["kept"] == 3
    lines = open(tmp_path / "prompts.txt", encoding="utf-8").read().splitlines()
    assert len(lines) == 3 and [item(cfg, i)[0] for i in range(3)] == lines
    assert [s["caption"] for _, s in sorted(read(out).items())] == lines
    assert generate(out, cfg, progress=False)["shards_written"] == 0
    d["prompts"]["count"] = 3
    with pytest.raises(ValueError, match="prompts: give one of llm, file, or templates"):
        PipelineConfig.from_dict(d)
    d["prompts"] = dict(llm=dict(model="random-tiny", count=0, out="x.txt"))
    with pytest.raises(ValueError, match="prompts.llm.count must be a positive int; got 0"):
        PipelineConfig.from_dict(d)
    d["prompts"] = dict(llm=dict(model="random-tiny", count=2))
    with pytest.raises(ValueError, match="prompts.llm.out must name the prompts file"):
        PipelineConfig.from_dict(d)


def test_a_matting_model_of_the_wrong_kind_is_named(tmp_path):
    from fast3d.datagen.matting import Matting

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(ValueError, match=r"matting.model .*/m' is not a transformers semantic-segmentation model"):
        Matting(str(tmp_path / "m"), 32, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"matting.background_label must be in \[0, 2\)"):
        Matting("random-tiny", 32, 2, torch.device("cpu"))
