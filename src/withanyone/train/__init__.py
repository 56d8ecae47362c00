"""Training the WithAnyone adapter: losses, a differentiable ArcFace, MultiID-2M samples, config and loop.

Heavy modules (diffusers, accelerate, kornia) are imported by the submodules that need them.
"""

from withanyone.train.config import PHASES, ConfigError, TrainConfig, load_config

__all__ = ["TrainConfig", "ConfigError", "PHASES", "load_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from withanyone.train.loop import train

        return train
    raise AttributeError(name)
