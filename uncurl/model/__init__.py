"""The model: a GPT-2 style SMoE decoder (`gpt`), its MoE layer (`moe`) on small C kernels
(`kernels`), the same model as a transformers model (`hf`, registered with AutoConfig and
AutoModelForCausalLM on import), checkpoints on disk (`checkpoint`, `convert` from the first
form) and expert parallelism across processes (`expert_parallel`)."""

from uncurl.model.checkpoint import load_model, save_checkpoint
from uncurl.model.gpt import GPT, Output, count_parameters, eval_mode
from uncurl.model.hf import UncurlConfig, UncurlForCausalLM
from uncurl.model.moe import MLP, GroupedMLP, MoE, Routing, dispatch, load_balancing_loss

__all__ = [
    "GPT",
    "MLP",
    "GroupedMLP",
    "MoE",
    "Output",
    "Routing",
    "UncurlConfig",
    "UncurlForCausalLM",
    "count_parameters",
    "dispatch",
    "eval_mode",
    "load_balancing_loss",
    "load_model",
    "save_checkpoint",
]
