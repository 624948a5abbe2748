"""Interop with Hugging Face transformers: export a run as a GPT-2 or Llama model directory, and start a run
from one (model.init_from), weights, config and tokenizer alike (docs/interop.md).

layouts.py   which layout a config is (or why none), config.json both ways
weights.py   parameter names and shapes both ways
export.py    `flowtrain export`; verify.py: its --verify (the only user of transformers itself)
source.py    what model.init_from points at: a transformers directory or a flowtrain run
init_from.py the run's config taken from the source, conflicts refused
"""

from flowtrain.interop.export import export_run

__all__ = ["export_run"]
