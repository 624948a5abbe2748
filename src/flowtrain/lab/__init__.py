"""The gradient-flow lab: textbook studies (norm placement, residuals, activations, clipping, warmup, init)
run on real data with flowtrain's own microscope, each ending in a measured verdict and an HTML page.

Public API: run_study(name, quick=False, data=None, out=None, echo=None) -> StudyResult; STUDIES (name ->
StudyInfo). See docs/lab.md.
"""

from flowtrain.lab.run import STUDIES, StudyResult, run_study

__all__ = ["STUDIES", "StudyResult", "run_study"]
