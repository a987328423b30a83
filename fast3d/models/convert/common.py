"""What every converter shares: reading a released checkpoint without unpickling, checking it
against a manifest of the original layout, accounting for every source key, and writing the
fast3d model directory atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping

import torch
from torch import Tensor

from fast3d.models import checkpoints

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# A training checkpoint may wrap the model's state dict (VFusion3D's .pth: {"model_state_dict": ...})
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
RECORD_FILE = "conversion.json"
_LIST = 8   # keys named in an error message, per kind of problem


def _names(keys, n: int = _LIST) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


def weights_file(path: str, what: str = "--weights") -> str:
    """The checkpoint file a user means: ``path`` itself, or in a directory its
    ``model.safetensors`` or its only weights file."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} must be a path to a checkpoint file or directory; got {path!r}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, checkpoints.CONFIG_FILE)):
            raise ValueError(f"{what} {path!r} is already a fast3d model directory (it has {checkpoints.CONFIG_FILE}); "
                             f"convert takes a released checkpoint file")
        if os.path.isfile(os.path.join(path, checkpoints.WEIGHTS_FILE)):
            return os.path.join(path, checkpoints.WEIGHTS_FILE)
        found = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))
        if len(found) != 1:
            raise ValueError(f"{what} {path!r}: expected one weights file ({', '.join(WEIGHT_SUFFIXES)}) in the "
                             f"directory; found {found or 'none'}")
        return os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist")
    if not path.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"{what} {path!r}: expected a {' / '.join(WEIGHT_SUFFIXES)} file")
    return path


def load_state_dict(path: str, what: str = "--weights") -> tuple[dict[str, Tensor], dict]:
    """A checkpoint's tensors, read without unpickling: safetensors, or ``torch.load(...,
    weights_only=True)`` for ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` (PyTorch's restricted loader,
    which refuses any object but tensors and plain containers). A state dict wrapped in a
    ``WRAPPER_KEYS`` entry is unwrapped (the other entries are reported as dropped).

    Returns:
        The state dict (str -> Tensor) and a record: the file, its size and sha256, the wrapper
        key and what was dropped around it.
    """
    f = weights_file(path, what)
    record = {"file": os.path.abspath(f), "bytes": os.path.getsize(f), "sha256": _sha256(f)}
    if f.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(f)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} {f!r}: not a readable safetensors file ({e}); a truncated or corrupted "
                             f"download? Compare its size and sha256 with the release's") from None
    else:
        import pickle

        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError,
                ImportError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{what} {f!r}: torch.load(weights_only=True) cannot read it ({first}); only plain "
                             f"state dicts of tensors load (nothing is unpickled), and a truncated file fails "
                             f"here too") from None
    if isinstance(obj, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is not None:
            record["unwrapped"] = wrapper
            record["dropped_around_state_dict"] = sorted(str(k) for k in obj if k != wrapper)
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} {f!r} holds a {type(obj).__name__}, not a state dict (a mapping of names to "
                         f"tensors)")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{what} {f!r} is not a plain state dict: entries that are not name -> tensor: "
                         f"{bad[:_LIST]}{' ...' if len(bad) > _LIST else ''}")
    return dict(obj), record


def _sha256(f: str) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def mismatches(state: Mapping[str, Tensor], manifest: Mapping[str, tuple]) -> tuple[list, list, list]:
    """Keys of the manifest missing from ``state``, keys of ``state`` the manifest lacks, and
    ``"key: got (shape) expected (shape)"`` for keys present in both with other shapes."""
    missing = sorted(set(manifest) - set(state))
    extra = sorted(set(state) - set(manifest))
    shaped = [f"{k}: got {tuple(state[k].shape)}, expected {tuple(manifest[k])}" for k in sorted(manifest)
              if k in state and tuple(state[k].shape) != tuple(manifest[k])]
    return missing, extra, shaped


def check_layout(state: Mapping[str, Tensor], manifest: Mapping[str, tuple], what: str, layout: str) -> None:
    """ValueError naming every missing, extra and mis-shaped key (up to ``_LIST`` of each, with
    counts) unless ``state`` has exactly the manifest's keys and shapes."""
    missing, extra, shaped = mismatches(state, manifest)
    if missing or extra or shaped:
        raise ValueError(f"{what} does not hold {layout} ({len(manifest)} tensors expected, {len(state)} found): "
                         f"{len(missing)} missing {_names(missing)}; {len(extra)} unexpected {_names(extra)}; "
                         f"{len(shaped)} mis-shaped {shaped[:_LIST]}")


class Consumer:
    """Accounts for every source key: each is taken (mapped into the fast3d state dict) or dropped
    with a reason exactly once; :meth:`finish` fails on any left over."""

    def __init__(self, state: Mapping[str, Tensor]):
        self.state = state
        self.used: set[str] = set()
        self.dropped: dict[str, str] = {}

    def take(self, key: str) -> Tensor:  # -> the source tensor, float32
        if key not in self.state:
            raise ValueError(f"converter bug: source key {key!r} is not in the checkpoint")
        if key in self.used or key in self.dropped:
            raise ValueError(f"converter bug: source key {key!r} consumed twice")
        self.used.add(key)
        return self.state[key].float()

    def drop(self, key: str, reason: str) -> None:
        if key in self.state:
            if key in self.used:
                raise ValueError(f"converter bug: source key {key!r} both used and dropped")
            self.dropped[key] = reason

    def finish(self) -> dict[str, str]:
        """The dropped keys with their reasons; ValueError if some key was neither used nor dropped."""
        left = set(self.state) - self.used - set(self.dropped)
        if left:
            raise ValueError(f"converter bug: {len(left)} source keys neither converted nor dropped: {_names(left)}")
        return dict(self.dropped)


def check_out_dir(out: str, what: str = "--out") -> str:
    """``out`` must be a new path or an empty directory, inside an existing directory."""
    if not isinstance(out, str) or not out:
        raise ValueError(f"{what} must be a directory path; got {out!r}")
    out = os.path.abspath(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ValueError(f"{what} {out!r} exists and is not a directory")
        if os.listdir(out):
            raise ValueError(f"{what} {out!r} exists and is not empty; give a new or empty directory")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {out!r}: its parent directory {parent!r} does not exist")
    return out


def write_model_dir(model, out: str, record: dict, what: str = "--out") -> str:
    """``model.save_pretrained`` + ``conversion.json`` (``record``) into a temporary directory
    beside ``out``, renamed to ``out`` when complete: an error or a kill leaves no half-written
    ``out`` (at most a ``.convert-*`` directory beside it)."""
    out = check_out_dir(out, what)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.convert-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, RECORD_FILE), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        if os.path.isdir(out):
            os.rmdir(out)       # empty (checked above); rename cannot replace a directory
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
