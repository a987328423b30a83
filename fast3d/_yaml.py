"""Reading YAML from users' and checkpoints' files: ``yaml.safe_load`` only (no tags that build
objects), a parse error as a ValueError naming the file."""

from __future__ import annotations

import yaml


def load_yaml(path: str):
    """The file's YAML document (any type: callers check the shape they need)."""
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
