"""The MV-LLaVA stage: strict score parsing, the 2x2 tiling, the prompts file, the keep / caption /
count logic, and the tiny random LLaVA built offline running end to end."""

import math
import os

import pytest
import torch

from fast3d.datagen import mvllm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = os.path.join(ROOT, "train", "configs", "mvllm_prompts.yaml")

PARSED = [
    ("Score: 4", 4), ("score 4", 4), ("SCORE:5", 5), ("Score - 2", 2), ("Grade = 2", 2), ("Rating: 1", 1),
    ("The quality score is 4/5.", 4), ("**Rating:** 5 out of 5", 5), ("quality score of 3", 3),
    ("The views are sharp and consistent. Score: 5", 5), ("4/5", 4), ("I'd give it 3 out of 5.", 3),
    ("4", 4), ("4.", 4), ("(3)", 3), ("4/5 overall. Score: 4", 4),
    ("On a scale from 1 to 5 the views are good. Score: 4", 4), ("The 3 views agree. Score: 5", 5),
]
REJECTED = [
    "", "nothing to say", "The object is a red mug.", "Score: 4.5", "Score: 4,5", "8/10", "score: 4/10",
    "Score: 0", "Score: 6", "Score: 10", "Score: -3", "Rating: +4", "Score: 3. On reflection, Score: 4",
    "4/5 but Score: 3", "I give it a four", "I give it a 4", "Score:", "4 5",
]


@pytest.mark.parametrize("answer,score", PARSED)
def test_parse_score_reads_the_stated_score(answer, score):
    assert mvllm.parse_score(answer) == score


@pytest.mark.parametrize("answer", REJECTED)
def test_parse_score_never_guesses(answer):
    assert mvllm.parse_score(answer) is None


def test_parse_score_refuses_a_non_string():
    with pytest.raises(ValueError, match="answer must be a string"):
        mvllm.parse_score(4)


def test_tile_views_puts_the_picks_in_a_2x2_grid(gen):
    views = torch.rand(2, 16, 3, 8, 8, generator=gen)
    grid = mvllm.tile_views(views, (0, 4, 8, 12))
    assert grid.shape == (2, 3, 16, 16)
    assert torch.equal(grid[:, :, :8, :8], views[:, 0]) and torch.equal(grid[:, :, :8, 8:], views[:, 4])
    assert torch.equal(grid[:, :, 8:, :8], views[:, 8]) and torch.equal(grid[:, :, 8:, 8:], views[:, 12])
    assert mvllm.spread_picks(16) == (0, 4, 8, 12) and mvllm.spread_picks(21) == (0, 5, 10, 15)
    with pytest.raises(ValueError, match=r"picks must be 4 view indices in \[0, 16\)"):
        mvllm.tile_views(views, (0, 4, 8, 16))
    with pytest.raises(ValueError, match="at least 4 views"):
        mvllm.spread_picks(3)


def test_prompts_file_is_checked(tmp_path):
    p = mvllm.load_prompts(PROMPTS)
    assert p.first().count(mvllm.IMAGE) == 1 and p.first().startswith("USER: <image>\n")
    second = p.second("a red mug")
    assert second.startswith(p.first() + " a red mug</s>USER: ") and second.endswith("ASSISTANT:")
    segs = p.training_segments("a red mug", 4, "Sharp views.")
    assert [a for _, a in segs] == [False, True, False, True]
    assert segs[3][0] == " Sharp views. Score: 4</s>" and mvllm.parse_score(segs[3][0]) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("describe: x\ngrade: y\nturn: 'no slot'\n")
    with pytest.raises(ValueError, match=r"turn must contain \{text\}"):
        mvllm.load_prompts(str(bad))
    bad.write_text("describe: x\ngrade: y\nanswr: z\n")
    with pytest.raises(ValueError, match="answr"):
        mvllm.load_prompts(str(bad))
    with pytest.raises(ValueError, match="prompts must be a YAML file"):
        mvllm.load_prompts(str(tmp_path / "missing.yaml"))


def test_model_sources_are_checked(tmp_path):
    with pytest.raises(ValueError, match="mvllm.model must be 'random-tiny' or a local LLaVA"):
        mvllm.check_source("mvllm.model", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        mvllm.check_source("mvllm.model", str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(ValueError, match="holds a 'blip' model"):
        mvllm.check_source("mvllm.model", str(tmp_path))


@pytest.fixture(scope="module")
def stage():
    return mvllm.MVLLMFilter(mvllm.RANDOM_TINY, PROMPTS, threshold=4, max_new_tokens=6, batch_size=2)


def test_verdicts_keep_at_the_threshold_caption_and_count(stage):
    before = stage.counts()
    r = stage.verdicts(["a red mug", "a chair", "a lamp", "a toy", ""],
                       ["Score: 4", "Score: 3", "no idea", "Sharp. Score: 5", "Score: 5"])
    assert r.keep.tolist() == [True, False, False, True, False]   # an empty description is no caption
    assert r.score[[0, 1, 3, 4]].tolist() == [4.0, 3.0, 5.0, 5.0] and math.isnan(r.score[2])
    after = stage.counts()
    assert {k: after[k] - before[k] for k in after} == {"seen": 5, "kept": 2, "rejected_low": 1,
                                                         "rejected_unparsed": 1}


def test_tiny_llava_runs_on_views_and_rejects_what_it_cannot_score(stage, gen):
    views = torch.rand(3, 16, 3, 16, 16, generator=gen)
    before = stage.counts()["rejected_unparsed"]
    r = stage.assess(views)
    assert len(r.descriptions) == len(r.answers) == 3 and r.keep.shape == (3,)
    # The random model's answers are what they are; whatever they say, keep follows the strict parse.
    for k, s, a in zip(r.keep.tolist(), r.score.tolist(), r.answers):
        parsed = mvllm.parse_score(a)
        assert (parsed is None and math.isnan(s)) or parsed == s
        assert k == (parsed is not None and parsed >= 4 and bool(r.descriptions[r.answers.index(a)].strip()))
    assert stage.counts()["rejected_unparsed"] - before == sum(mvllm.parse_score(a) is None for a in r.answers)


def _pipeline_dict(filter_section, count=4) -> dict:
    return {"prompts": {"templates": ["a {c} mug"], "vocab": {"c": ["red", "blue"]}, "count": count},
            "t2i": {"model": "random-tiny", "steps": 2, "resolution": 32, "batch_size": 4},
            "mv": {"model": "random-tiny", "views": 4, "resolution": 16, "steps": 2},
            "filter": filter_section, "shards": {"samples_per_shard": count}, "device": "cpu"}


def _pipeline_config(tmp_path, filter_section, count=4):
    from fast3d.datagen.pipeline.config import PipelineConfig

    return PipelineConfig.from_dict(_pipeline_dict(filter_section, count))


def test_bad_stage_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"threshold must be an int in \[1, 5\]"):
        mvllm.MVLLMFilter(mvllm.RANDOM_TINY, PROMPTS, threshold=6)
    for options, match in (({"prompts": PROMPTS, "threshold": 0}, r"filter.options.threshold must be an int in \[1, 5\]"),
                           ({"prompts": PROMPTS, "picks": [0, 1]}, "filter.options.picks"),
                           ({"prompts": PROMPTS, "modle": "x"}, "modle"),
                           ({"prompts": str(tmp_path / "none.yaml")}, "prompts must be a YAML file"),
                           ({"prompts": PROMPTS, "model": str(tmp_path / "none")}, "filter.options.model must be")):
        with pytest.raises(ValueError, match=match):
            _pipeline_config(tmp_path, {"kind": "mvllm", "options": options})
    with pytest.raises(ValueError, match="filter.dir and filter.threshold must be null"):
        _pipeline_config(tmp_path, {"kind": "mvllm", "threshold": 4, "options": {"prompts": PROMPTS}})


@pytest.mark.slow
def test_pipeline_runs_the_mvllm_filter_and_writes_its_captions_and_scores(tmp_path, monkeypatch, capsys):
    """`filter.kind: mvllm` in `fast3d datagen pipeline`: kept samples carry the description as caption
    and the score as quality; the rest (low or unparsable) are rejected, and the unparsable one is
    counted in the returned counts, on the progress bar and in the command's summary. The random
    model's words are replaced by scripted answers, so the pipeline's handling is what is checked."""
    import yaml

    from fast3d.cli import main
    from fast3d.data.dataset import MultiViewDataset
    from fast3d.datagen.pipeline import engine

    script = ["a red mug", "a blue mug", "a mug", "a cup", "Score: 5", "Score: 2", "no score", "4/5"]
    answers = iter(script * 2)

    def scripted(self, texts, images):
        return [next(answers) for _ in texts]

    monkeypatch.setattr(mvllm.MVLLMFilter, "_generate", scripted)
    section = {"kind": "mvllm", "options": {"prompts": PROMPTS, "max_new_tokens": 4}}
    counts = engine.generate(str(tmp_path / "out"), _pipeline_config(tmp_path, section), progress=False)
    assert counts["kept"] == 2 and counts["rejected"] == 2 and counts["rejected_unscored"] == 1
    got = {s["key"]: s for s in MultiViewDataset(str(tmp_path / "out"), views=4, resolution=16)}
    assert [(s["caption"], s["quality"]) for _, s in sorted(got.items())] == [("a red mug", 5.0), ("a cup", 4.0)]
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_pipeline_dict(section)))
    capsys.readouterr()
    assert main(["datagen", "pipeline", "--config", str(config), "--out", str(tmp_path / "cli")]) == 0
    out, err = capsys.readouterr()
    assert "(2 kept, 2 rejected by the filter, 1 of them without a score)" in out
    assert "kept=2, rejected=2, unscored=1" in err


def test_caption_records_feed_the_recipe(tmp_path, capsys, seed):
    """`fast3d datagen mvllm-records`: one record per captioned sample, its caption as description,
    seeded grades in 1..5 (the same file for the same seed), that the mvllm recipe reads; bad
    arguments named."""
    import json

    from fast3d.cli import main
    from fast3d.data.dataset import MultiViewDataset
    from fast3d.datagen import procedural
    from fast3d.training.recipes.mvllm import read_annotations

    data = str(tmp_path / "train")
    procedural.run(data, procedural.ProceduralConfig(num_objects=5, views=4, rig="orbit16", resolution=8,
                                                     gaussians_per_object=50, samples_per_shard=5, batch_size=5,
                                                     save_ply=False, seed=seed % 1000))
    capsys.readouterr()
    out = tmp_path / "a.jsonl"
    argv = ["datagen", "mvllm-records", "--data", data, "--out", str(out), "--seed", str(seed % 1000)]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"records": 5, "skipped": 0, "out": str(out)}
    records = read_annotations(str(out))
    captions = {s["key"]: s["caption"] for s in MultiViewDataset(data, views=1, resolution=8)}
    assert {k: r["description"] for k, r in records.items()} == captions
    assert all(1 <= r["score"] <= 5 for r in records.values())
    first = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == first
    assert mvllm.caption_records(data, str(tmp_path / "b.jsonl"), score=4)["records"] == 5
    assert {r["score"] for r in read_annotations(str(tmp_path / "b.jsonl")).values()} == {4}
    capsys.readouterr()
    assert main(["datagen", "mvllm-records", "--data", data, "--out", str(out), "--score", "6"]) == 2
    assert "score must be null or an int in [1, 5]; got 6" in capsys.readouterr().err
    with pytest.raises(ValueError, match="data must be a directory of multi-view shards"):
        mvllm.caption_records(str(tmp_path / "none"), str(out))
