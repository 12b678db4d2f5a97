"""Published model configurations (architecture only, no weights): the SD1.5 and SDXL
UNet2DConditionModel, the FLUX.1-dev, SD3.5-large, PixArt-Σ and Wan 2.1 T2V 1.3B
transformers (copies of the hub's config.json files, as ../shared/configs holds them).
They ship with the package so that benchmarks build real architectures on a machine that
has only the checkout."""
import json
import os

_HERE = os.path.dirname(__file__)
UNET_CONFIGS = ("sd15_unet", "sdxl_unet")
TRANSFORMER_CONFIGS = ("flux1_dev_transformer", "sd35_large_transformer", "pixart_sigma_transformer",
                       "wan21_t2v_1_3b_transformer")


def _load(name: str, known: tuple) -> dict:
    if name not in known:
        raise ValueError(f"name: expected one of {known}, got {name!r}")
    with open(os.path.join(_HERE, f"{name}.json")) as f:
        return json.load(f)


def load_unet_config(name: str) -> dict:
    """The config dict of ``name`` ("sd15_unet" or "sdxl_unet"), for UNet2DConditionModel.from_config."""
    return _load(name, UNET_CONFIGS)


def load_transformer_config(name: str) -> dict:
    """The config dict of ``name`` (see TRANSFORMER_CONFIGS); its "_class_name" names the
    diffusers class that builds it."""
    return _load(name, TRANSFORMER_CONFIGS)
