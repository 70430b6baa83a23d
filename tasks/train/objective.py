"""Where the training code found the objectives before they moved to tasks/diffusion (kept for its importers)."""
from tasks.diffusion.objectives import *  # noqa: F401,F403
from tasks.diffusion.objectives import (  # noqa: F401  (names outside __all__ that importers use)
    cosmap_weight,
    ddpm_noisy,
    flow_denoised,
    flow_noisy,
    flow_target,
    flow_timestep,
    sigma_from_uniform,
)
