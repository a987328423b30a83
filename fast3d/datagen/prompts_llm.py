"""`fast3d datagen prompts`: object-centric text prompts from a local causal language model, for the
pipeline's ``prompts.file`` (which, like ``prompts.templates``, stays an option for prompts of
your own).

Both papers make their prompts with an LLM: Bootstrap3D has GPT-4 write 20K prompts, VFusion3D runs
Llama2 with "a specially designed prompting template [that] incorporates in-context examples" to
keep object-centric captions. Here a transformers ``AutoModelForCausalLM`` (a local directory,
never downloaded, or ``random-tiny``: a small random Llama with a word-level tokenizer, for tests)
continues an in-context template: the template text holds ``{examples}``, replaced by ``shots``
example prompts drawn from the example file (one a line; built-in ones by default), each as a
line ``- prompt``, and ends where the model writes the next line; the first line it writes is
the new prompt.

* De-duplicated: prompts are compared case- and whitespace-insensitively, against each other and
  the examples; empty or over-long lines are dropped.
* Seeded: call ``b`` (``per_call`` sampled continuations) draws its examples and its sampling noise
  from (``seed``, b) alone, so the list is a pure function of the configuration.
* Resumable: after each call the prompts so far and the number of calls made are written
  atomically (``OUT`` and ``OUT.state.json``); a rerun with the same configuration continues from
  there and ends with the same list as an uninterrupted run; another configuration is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch

from fast3d.inference.common import default_device
from fast3d.io.atomic import write_atomic

RANDOM_TINY = "random-tiny"
PLACEHOLDER = "{examples}"
DEFAULT_TEMPLATE = (
    "Below are prompts for a 3D generator. Each describes one single object, centred, on its own: "
    "its kind, shape, colours and materials, with no scene, no people and no background.\n"
    f"{PLACEHOLDER}\n- "
)
DEFAULT_EXAMPLES = (
    "a red ceramic teapot with a bamboo handle",
    "a wooden rocking chair with a woven seat",
    "a small green cactus in a terracotta pot",
    "a vintage brass telescope on a tripod",
    "a blue ceramic mug with white polka dots",
    "a toy robot made of tin with round eyes",
    "a leather armchair with brass studs",
    "a stone gargoyle statue with folded wings",
)
MAX_PROMPT_CHARS = 300


@dataclass(frozen=True)
class PromptLMConfig:
    """What ``generate_prompts`` does; every field is recorded in the state file."""
    model: str = RANDOM_TINY       # a local causal-LM directory (model + tokenizer), or "random-tiny"
    count: int = 100               # unique prompts wanted
    template: str | None = None    # a UTF-8 template file holding {examples}; null: DEFAULT_TEMPLATE
    examples: str | None = None    # a UTF-8 file of example prompts, one a line; null: DEFAULT_EXAMPLES
    shots: int = 4                 # examples per call
    per_call: int = 8              # continuations sampled per call
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    max_calls: int | None = None   # give up after this many calls (default: 20 x the calls count needs)

    def validate(self) -> None:
        for name in ("count", "shots", "per_call", "max_new_tokens"):
            _positive_int(name, getattr(self, name))
        if self.max_calls is not None:
            _positive_int("max_calls", self.max_calls)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0; got {self.seed!r}")
        for name, lo, hi in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
                raise ValueError(f"{name} must be a number in ({lo}, {hi}]; got {v!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be {RANDOM_TINY!r} or a local causal-LM directory; got {self.model!r}")
        if self.model != RANDOM_TINY and not os.path.isdir(self.model):
            raise ValueError(f"model must be {RANDOM_TINY!r} or a local causal-LM directory; got {self.model!r}, which "
                             f"is not a directory (weights are never downloaded)")
        load_template(self.template)
        if len(load_examples(self.examples)) < self.shots:
            raise ValueError(f"examples: {len(load_examples(self.examples))} example prompts, fewer than shots="
                             f"{self.shots}")

    @property
    def calls_limit(self) -> int:
        return self.max_calls or 20 * -(-self.count // self.per_call)


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int; got {v!r}")


def _read_text(path: str, what: str) -> str:
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"{what} must be a UTF-8 text file; got {path!r}, which is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 ({e})") from None


def load_template(path: str | None) -> str:
    """The template text (DEFAULT_TEMPLATE when ``path`` is None); it must hold {examples} once."""
    text = DEFAULT_TEMPLATE if path is None else _read_text(path, "template")
    if text.count(PLACEHOLDER) != 1:
        raise ValueError(f"template {path or 'DEFAULT_TEMPLATE'!r} must hold {PLACEHOLDER} exactly once; found it "
                         f"{text.count(PLACEHOLDER)} times")
    return text


def load_examples(path: str | None) -> list[str]:
    """The example prompts (DEFAULT_EXAMPLES when ``path`` is None), blank lines skipped."""
    if path is None:
        return list(DEFAULT_EXAMPLES)
    lines = [line.strip() for line in _read_text(path, "examples").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"examples {path!r} holds no prompts")
    return lines


def normalise(prompt: str) -> str:
    """The de-duplication key: case-folded, whitespace collapsed, trailing punctuation dropped."""
    return re.sub(r"\s+", " ", prompt).strip().strip(".,;:!").strip().casefold()


def clean(continuation: str) -> str | None:
    """The prompt in a model's continuation: its first line, without a list marker or quotes;
    None when nothing is left or it is too long to be a prompt."""
    line = continuation.split("\n", 1)[0].strip()
    line = re.sub(r"^(?:[-*\u2022]|\d+[.)])\s*", "", line).strip().strip("\"'").strip()
    line = re.sub(r"\s+", " ", line)
    if not line or len(line) > MAX_PROMPT_CHARS or not any(c.isalpha() for c in line):
        return None
    return line


def _tiny_lm(words: list[str]):
    """A random tiny Llama and a word-level tokenizer (words, spaces and newlines as tokens, decoded
    by concatenation) over ``words``: the same model every time."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "<s>", "</s>", " ", "\n", "-"]
    for w in words:
        if w not in vocab:
            vocab.append(w)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|-"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                        eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def load_lm(cfg: PromptLMConfig, device: torch.device):
    """(model, tokenizer) of ``cfg.model``; ValueError naming ``model`` when it is not a causal LM."""
    if cfg.model == RANDOM_TINY:
        words = sorted({w for text in (load_template(cfg.template), *load_examples(cfg.examples))
                        for w in re.split(r"\s|-", text) if w})
        model, tokenizer = _tiny_lm(words)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"model {cfg.model!r} is not a transformers causal LM with its tokenizer "
                             f"(AutoModelForCausalLM / AutoTokenizer): {type(e).__name__}: {e}") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _call_seed(seed: int, call: int) -> int:
    return (seed * 1_000_003 + call) % 2**63


def query(template: str, examples: list[str], shots: int, seed: int, call: int) -> str:
    """Call ``call``'s prompt: the template with ``shots`` examples drawn from (seed, call)."""
    g = torch.Generator().manual_seed(_call_seed(seed, call))
    picked = [examples[i] for i in torch.randperm(len(examples), generator=g)[:shots].tolist()]
    return template.replace(PLACEHOLDER, "\n".join(f"- {e}" for e in picked))


@torch.no_grad()
def sample_call(model, tokenizer, text: str, cfg: PromptLMConfig, call: int) -> list[str]:
    """The ``per_call`` continuations of ``text`` (decoded, the query cut off), noise from (seed, call)."""
    device = next(model.parameters()).device
    inputs = tokenizer(text, return_tensors="pt").to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_call_seed(cfg.seed, call))
        out = model.generate(**inputs, do_sample=True, temperature=float(cfg.temperature), top_p=float(cfg.top_p),
                             max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.per_call,
                             pad_token_id=tokenizer.pad_token_id)
    n = inputs["input_ids"].shape[1]
    return tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)


def _state_path(out: str) -> str:
    return out + ".state.json"


def generate_prompts(cfg: PromptLMConfig, out: str, device: str | None = None, progress: bool = True) -> dict:
    """Write ``cfg.count`` unique prompts to the text file ``out`` (one a line), continuing a run
    that was interrupted (module docstring).

    Args:
        cfg: the configuration.
        out: the prompts file (its state is ``out + ".state.json"``).
        device: where the LM runs (default: CUDA when there is one).
        progress: print a line per call on stderr.

    Returns:
        counts: prompts (in the file), calls (made in all), duplicates and rejected (continuations
        dropped in the calls made now), resumed (whether a previous run was continued).

    Raises:
        ValueError: bad configuration, another configuration's state next to ``out``, or fewer than
        ``count`` unique prompts after ``calls_limit`` calls (the prompts so far stay in ``out``).
    """
    if not isinstance(cfg, PromptLMConfig):
        raise ValueError(f"cfg must be a PromptLMConfig; got {type(cfg).__name__}")
    cfg.validate()
    record = dataclasses.asdict(cfg)
    prompts, calls, resumed = [], 0, False
    if os.path.exists(_state_path(out)):
        try:
            with open(_state_path(out), encoding="utf-8") as f:
                state = json.load(f)
            theirs, calls = state["config"], int(state["calls"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{_state_path(out)} is unreadable ({type(e).__name__}: {e}); delete it and {out} to "
                             f"start again") from None
        if theirs != record:
            raise ValueError(f"out {out!r} was made with another configuration ({theirs}; this one is {record}); "
                             f"use another output file")
        with open(out, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        resumed = True
    elif os.path.exists(out):
        raise ValueError(f"out {out!r} exists and has no {os.path.basename(_state_path(out))}: refusing to overwrite "
                         f"a prompts file this command did not write")
    examples = load_examples(cfg.examples)
    template = load_template(cfg.template)
    seen = {normalise(p) for p in prompts} | {normalise(e) for e in examples}
    duplicates = rejected = 0
    model = tokenizer = None
    while len(prompts) < cfg.count:
        if calls >= cfg.calls_limit:
            raise ValueError(f"count: the model gave {len(prompts)} unique prompts in {calls} calls, fewer than the "
                             f"{cfg.count} asked for (max_calls {cfg.calls_limit}); they are in {out}. Raise max_calls, "
                             f"temperature or top_p, or use another model")
        if model is None:
            dev = default_device(device)
            model, tokenizer = load_lm(cfg, dev)
        text = query(template, examples, cfg.shots, cfg.seed, calls)
        for continuation in sample_call(model, tokenizer, text, cfg, calls):
            p = clean(continuation)
            if p is None:
                rejected += 1
            elif normalise(p) in seen:
                duplicates += 1
            elif len(prompts) < cfg.count:
                seen.add(normalise(p))
                prompts.append(p)
        calls += 1
        write_atomic(out, "".join(p + "\n" for p in prompts).encode("utf-8"))
        write_atomic(_state_path(out), json.dumps({"config": record, "calls": calls}, indent=1).encode())
        if progress:
            print(f"fast3d datagen prompts: call {calls}: {len(prompts)}/{cfg.count} prompts", file=sys.stderr)
    return {"prompts": len(prompts), "calls": calls, "duplicates": duplicates, "rejected": rejected,
            "resumed": resumed}
