"""Shipped diffusers configs (no weights) so single-file loading works offline."""
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent
# The public SD1.5 (runwayml/stable-diffusion-v1-5) component configs, diffusers layout.
SD15_CONFIG_DIR = CONFIGS_DIR / "sd15"
