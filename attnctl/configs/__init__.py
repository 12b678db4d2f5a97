"""Published UNet2DConditionModel configurations (architecture only, no weights)."""
import json
import os

_HERE = os.path.dirname(__file__)
UNET_CONFIGS = ("sd15_unet", "sdxl_unet")


def load_unet_config(name: str) -> dict:
    """The config dict of ``name`` ("sd15_unet" or "sdxl_unet"), for UNet2DConditionModel.from_config."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"name: expected one of {UNET_CONFIGS}, got {name!r}")
    with open(os.path.join(_HERE, f"{name}.json")) as f:
        return json.load(f)
