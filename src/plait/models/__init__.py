"""plait's model zoo: plain PyTorch models that accept the meta device."""

from plait.models.gpt import GPT, GPT_CONFIGS, GPTConfig, lm_batch, lm_loss, token_batch
from plait.models.mlp import MLP, MLP_CONFIGS, MLPConfig, mse_loss, regression_batch
from plait.models.zoo import ZOO, ZooModel, zoo_model

__all__ = [
    "GPT",
    "GPT_CONFIGS",
    "MLP",
    "MLP_CONFIGS",
    "ZOO",
    "GPTConfig",
    "MLPConfig",
    "ZooModel",
    "lm_batch",
    "lm_loss",
    "mse_loss",
    "regression_batch",
    "token_batch",
    "zoo_model",
]
