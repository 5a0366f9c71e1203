"""Rewrite pyproject's [tool.flwr.app.config.*] tables from fedtune's config defaults.

Run after changing a default or adding a key: python scripts/sync_flwr_config.py
"""
import sys
import tomli_w
from fedtune.config import Config, to_dict
MARK = "# The run config `flwr run .` starts from"
d = to_dict(Config())
for sec in d:
    for k, v in d[sec].items():
        if isinstance(v, list):
            d[sec][k] = ",".join(map(str, v))
block = tomli_w.dumps({"tool": {"flwr": {"app": {"config": d}}}})
path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
text = open(path).read()
head = text[:text.index(MARK)]
line = text[text.index(MARK):].splitlines()[0]
open(path, "w").write(head + line + "\n" + block)
