"""``python -m fastalign.memory MODEL --batch-size B --seq-len T ...``."""

from .command import cli

raise SystemExit(cli())
