"""`fast3d datagen prompts` on a random tiny Llama (a real transformers causal LM and generate()):
the list is unique, a pure function of the configuration, and an interrupted run continues to the
same list; the template and example files are honoured; bad input is named."""

import json
import os
import re

import pytest

from fast3d.cli import main
from fast3d.datagen import prompts_llm as pl


def small(**kw) -> pl.PromptLMConfig:
    return pl.PromptLMConfig(**{**dict(count=6, per_call=3, max_new_tokens=6, seed=1), **kw})


def test_prompts_are_unique_seeded_and_resume_to_the_same_list(tmp_path, seed, monkeypatch):
    cfg = small(seed=seed % 1000)
    out = str(tmp_path / "p.txt")
    r = pl.generate_prompts(cfg, out, progress=False)
    first = open(out, encoding="utf-8").read().splitlines()
    assert r["prompts"] == len(first) == 6 and not r["resumed"]
    keys = [pl.normalise(p) for p in first]
    assert len(set(keys)) == 6 and not set(keys) & {pl.normalise(e) for e in pl.DEFAULT_EXAMPLES}
    assert all(p == pl.clean(p) for p in first)
    # an interrupted run (killed after its first call) continues to the same list
    other = str(tmp_path / "q.txt")
    calls = []
    real = pl.sample_call

    def dies_after_one(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(pl, "sample_call", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        pl.generate_prompts(cfg, other, progress=False)
    monkeypatch.setattr(pl, "sample_call", real)
    assert json.load(open(other + ".state.json"))["calls"] == 1
    again = pl.generate_prompts(cfg, other, progress=False)
    assert again["resumed"] and open(other, encoding="utf-8").read().splitlines() == first
    assert pl.generate_prompts(cfg, other, progress=False)["calls"] == r["calls"]   # done: no call made
    # another seed, another list; another configuration in the same file is refused
    assert pl.generate_prompts(small(seed=seed % 1000 + 1), str(tmp_path / "s.txt"), progress=False)
    assert open(tmp_path / "s.txt", encoding="utf-8").read().splitlines() != first
    with pytest.raises(ValueError, match="was made with another configuration"):
        pl.generate_prompts(small(seed=seed % 1000, count=7), out, progress=False)


def test_template_and_examples_files_reach_the_model(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("Objects:\n{examples}\n- ", encoding="utf-8")
    (tmp_path / "e.txt").write_text("a copper kettle\n\na glass vase\na felt hat\n", encoding="utf-8")
    seen = []

    def fake_call(model, tokenizer, text, cfg, call):
        seen.append(text)
        return ["a copper kettle\nrest", f"  - \"A thing number {call}\" ", "", "1) a glass vase"]

    monkeypatch.setattr(pl, "sample_call", fake_call)
    cfg = small(template=str(tmp_path / "t.txt"), examples=str(tmp_path / "e.txt"), shots=2, count=3)
    r = pl.generate_prompts(cfg, str(tmp_path / "p.txt"), progress=False)
    assert open(tmp_path / "p.txt", encoding="utf-8").read().splitlines() == ["A thing number 0", "A thing number 1",
                                                                              "A thing number 2"]
    assert r["duplicates"] == 6 and r["rejected"] == 3     # the examples themselves; empty continuations
    assert seen[0].startswith("Objects:\n- ") and seen[0].endswith("\n- ") and seen[0].count("\n- a ") == 2
    assert seen[0] == pl.query(pl.load_template(cfg.template), pl.load_examples(cfg.examples), 2, cfg.seed, 0)


def test_too_few_unique_prompts_stop_with_what_was_found(tmp_path, monkeypatch):
    monkeypatch.setattr(pl, "sample_call", lambda *a: ["a teapot", "a teapot", "a teapot"])
    with pytest.raises(ValueError, match=r"the model gave 1 unique prompts in 4 calls, fewer than the 6 asked for"):
        pl.generate_prompts(small(max_calls=4), str(tmp_path / "p.txt"), progress=False)
    assert open(tmp_path / "p.txt", encoding="utf-8").read() == "a teapot\n"


@pytest.mark.parametrize("argv, match", [
    (["--model", "/nonexistent/llama"], "model must be 'random-tiny' or a local causal-LM directory"),
    (["--count", "0"], "count must be a positive int; got 0"),
    (["--template", "/nonexistent/t.txt"], "template must be a UTF-8 text file"),
    (["--top-p", "1.5"], r"top_p must be a number in \(0.0, 1.0\]"),
    (["--shots", "9"], "examples: 8 example prompts, fewer than shots=9"),
])
def test_cli_bad_input(tmp_path, capsys, argv, match):
    full = ["datagen", "prompts", "--model", "random-tiny", "--count", "3", "--out", str(tmp_path / "p.txt"), *argv]
    assert main(full) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "p.txt")


def test_not_a_causal_lm_and_foreign_file_are_named(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "nonesuch"}')
    with pytest.raises(ValueError, match="is not a transformers causal LM"):
        pl.load_lm(small(model=str(tmp_path / "model")), None)
    (tmp_path / "mine.txt").write_text("my own prompts\n")
    with pytest.raises(ValueError, match="exists and has no mine.txt.state.json"):
        pl.generate_prompts(small(), str(tmp_path / "mine.txt"), progress=False)
