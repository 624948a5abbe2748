"""flowtrain in other training loops: the same microscope, warnings and run directory as `flowtrain train`.

    flowtrain.watch(model, optimizer, run_dir=...)          a plain loop (integrations/watch.py)
    flowtrain.integrations.hf.FlowtrainCallback             transformers' Trainer
    flowtrain.integrations.lightning.FlowtrainCallback      Lightning's Trainer

transformers and Lightning are optional: each module imports its framework, and says what to pip install when
it is missing (docs/integrations.md).
"""

from flowtrain.integrations.watch import Watch, watch

__all__ = ["Watch", "watch"]
