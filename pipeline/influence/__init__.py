"""Diff-In math on tensors and parameter dicts: no files, no Ray, no webdataset.

- :mod:`.objective` — per-sample losses (CLIP against a negative bank; classifiers)
- :mod:`.prepare`   — per checkpoint: u_t, g_t, w_t = H_B u_t (exact or finite difference)
- :mod:`.forward`   — per sample: a, b, c by forward-mode differentiation
- :mod:`.scores`    — tracin, diffin_eq9, diffin from the components
- :mod:`.window`    — which checkpoints are scored (all, or those up to L_V's lowest)
"""

from pipeline.influence.forward import CheckpointScorer, Components
from pipeline.influence.objective import (CLIPBankObjective, ClassifierObjective, PerSampleObjective,
                                          bank_infonce, forward_mode_safe, per_sample_loss)
from pipeline.influence.prepare import PreparedCheckpoint, hvp_exact, hvp_fd, mean_loss_grad, prepare_checkpoint
from pipeline.influence.scores import CheckpointWeights, combine

__all__ = [
    "CLIPBankObjective", "CheckpointScorer", "CheckpointWeights", "ClassifierObjective", "Components",
    "PerSampleObjective", "PreparedCheckpoint", "bank_infonce", "combine", "forward_mode_safe",
    "hvp_exact", "hvp_fd", "mean_loss_grad", "per_sample_loss", "prepare_checkpoint",
]
