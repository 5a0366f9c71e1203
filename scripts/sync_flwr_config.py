"""Rewrite pyproject.toml's [tool.flwr.app.config.*] tables from fedtune's config defaults, so
that `flwr run .` starts from the same defaults as `fedtune run`.

Run it after changing a default or adding a key (a new strategy's hyper-parameter, say):

    python scripts/sync_flwr_config.py            # rewrite pyproject.toml
    python scripts/sync_flwr_config.py --check    # exit 1 if pyproject.toml is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tomli_w

from fedtune.config import Config, to_dict

MARK = "# The run config `flwr run .` starts from"


def synced(text: str) -> str:
    """``text`` (a pyproject.toml) with its Flower config tables made from the defaults."""
    defaults = to_dict(Config())
    for section in defaults.values():
        for key, value in section.items():
            if isinstance(value, list):
                section[key] = ",".join(map(str, value))
    block = tomli_w.dumps({"tool": {"flwr": {"app": {"config": defaults}}}})
    head = text[:text.index(MARK)]
    line = text[text.index(MARK):].splitlines()[0]
    return head + line + "\n" + block


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report a stale file")
    parser.add_argument("path", nargs="?", default="pyproject.toml")
    args = parser.parse_args()
    path = Path(args.path)
    text = path.read_text(encoding="utf-8")
    if args.check:
        if synced(text) != text:
            print(f"{path} is stale: run python scripts/sync_flwr_config.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(synced(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
