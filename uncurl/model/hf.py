"""Our GPT as a transformers model, so that the tools people evaluate and serve language models
with open the study's checkpoints.

`UncurlConfig` (model type "uncurl") declares `ModelConfig`'s fields as its own and
`UncurlForCausalLM` wraps our `GPT` (no second model definition); importing `uncurl.model`
registers both with `AutoConfig` / `AutoModelForCausalLM`. A checkpoint folder also holds two
small files (`SHIMS`) that import them from the installed uncurl and that its config's `auto_map`
names, so that `from_pretrained(DIR, trust_remote_code=True)` works without importing uncurl first.

The weights keep our names (`wte.weight`, `h.0.attn.c_attn.weight`, ...; the head is tied to
`wte.weight` and not stored): transformers adds the wrapper's `gpt.` prefix when it loads them
and removes it when it saves, so `save_pretrained` writes the files `uncurl.model.load_model`
reads.

There is no KV cache: each `generate()` step runs the model on the whole sequence (its last
`block_size` tokens), which at our context lengths (128) costs little. Positions are learned and
absolute and the attention has no padding mask, so right padding leaves the logits of real
tokens unchanged, and left (or inner) padding, which would move them, is refused.
"""

import dataclasses
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange
from transformers.modeling_outputs import CausalLMOutput

from uncurl.config import ModelConfig
from uncurl.model.gpt import GPT

MODEL_TYPE = "uncurl"
MODEL_FIELDS = dataclasses.fields(ModelConfig)
INFO_KEY = "uncurl"  # the config.json key of what made the model (training, reduction, ...)
SHIMS = {
    "configuration_uncurl.py": "from uncurl.model.hf import UncurlConfig  # pip install uncurl\n",
    "modeling_uncurl.py": "from uncurl.model.hf import UncurlForCausalLM  # pip install uncurl\n",
}
AUTO_MAP = {
    "AutoConfig": "configuration_uncurl.UncurlConfig",
    "AutoModelForCausalLM": "modeling_uncurl.UncurlForCausalLM",
}

# ModelConfig's fields, defaults included, declared as the config's own: one source of truth. A
# declared field may share a name with a generation setting (`top_k`) without transformers
# refusing to save it.
_ModelFields = type(
    "_ModelFields",
    (PreTrainedConfig,),
    {
        "__module__": __name__,
        "__annotations__": {f.name: f.type for f in MODEL_FIELDS},
        **{f.name: f.default for f in MODEL_FIELDS},
    },
)


class UncurlConfig(_ModelFields):
    """ModelConfig's fields, plus what made the model under `uncurl` (config.json's INFO_KEY)."""

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "block_size",
    }
    tie_word_embeddings: bool = True
    uncurl: dict | None = None  # INFO_KEY

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = dict(AUTO_MAP)
        self.model_config()  # refuse settings our GPT cannot be built with, with its error

    @classmethod
    def of(cls, cfg: ModelConfig, info: dict | None = None, dtype=torch.float32) -> "UncurlConfig":
        """The config of a GPT of settings `cfg` with weights in `dtype`, as `save_pretrained`
        writes it."""
        return cls(
            **cfg.to_dict(),
            uncurl=info or {},
            architectures=[UncurlForCausalLM.__name__],
            dtype=str(dtype).removeprefix("torch."),
        )

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({f.name: getattr(self, f.name) for f in MODEL_FIELDS})

    def to_dict(self) -> dict:
        """transformers' dict, without `tied_experts` when there are none: an untied model's
        config.json (and so its digest) is what it was before tied experts existed."""
        d = super().to_dict()
        if not d.get("tied_experts"):
            d.pop("tied_experts", None)
        return d

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing: `auto_map` names the checkpoint's shims, which transformers would replace by
        a copy of this module (it does so for every class it has registered)."""


def generation_config(tokenizer=None) -> GenerationConfig:
    """No KV cache (`use_cache=False`), and the tokenizer's end-of-text token, if given."""
    ids = {} if tokenizer is None else {"eos_token_id": tokenizer.eos_token_id}
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    return GenerationConfig(use_cache=False, **ids)


class UncurlGenerationConfig(GenerationConfig):
    """What a new model generates with: never read from its config, whose `top_k` counts the
    experts a token is routed to, not the tokens sampling keeps."""

    @classmethod
    def from_model_config(cls, model_config) -> GenerationConfig:
        return generation_config()


def write_shims(folder) -> None:
    """The files `auto_map` names, into checkpoint folder `folder`."""
    for name, text in SHIMS.items():
        (Path(folder) / name).write_text(text)


class UncurlForCausalLM(PreTrainedModel, GenerationMixin):
    """Our GPT (`self.gpt`) behind transformers' causal-LM interface. In eval mode every forward
    pass is dropless (no expert capacity), so a token's logits do not depend on its batch; in
    training mode the experts' capacity applies, as in our training."""

    config_class = UncurlConfig
    generation_config_class = UncurlGenerationConfig
    base_model_prefix = "gpt"
    _tied_weights_keys = {"gpt.lm_head.weight": "gpt.wte.weight"}

    def __init__(self, config: UncurlConfig):
        super().__init__(config)
        self.gpt = GPT(config.model_config())
        self.post_init()

    @classmethod
    def wrapping(cls, gpt: GPT) -> "UncurlForCausalLM":
        """`gpt` itself (not a copy) as a transformers model."""
        dtype = next(gpt.parameters()).dtype
        with torch.device("meta"):  # the GPT the constructor would build is dropped at once
            wrapper = cls(UncurlConfig.of(gpt.cfg, dtype=dtype))
        wrapper.gpt = gpt
        return wrapper.train(gpt.training)

    def _init_weights(self, module):
        """Nothing: GPT draws its own weights (GPT-2's scheme), and loading replaces them all."""

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=True):
        """Logits (B, T, V) and, given `labels`, transformers' causal-LM loss (labels shifted
        inside, -100 ignored; the load-balancing loss is not added)."""
        if attention_mask is not None and (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError(
                "attention_mask pads on the left or inside a sequence: this model's positions are "
                "absolute and its attention has no padding mask, so only right padding leaves the "
                "real tokens' logits unchanged; pad on the right, or generate from one prompt "
                "(or prompts of one length) at a time"
            )
        logits = self.gpt(input_ids, dropless=not self.training).logits
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size)
        out = CausalLMOutput(loss=loss, logits=logits)
        return out if return_dict else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **generate_state):
        """Without a KV cache each step reads the whole sequence, cut to its last block_size
        tokens (the context); `generate`'s cache bookkeeping is not needed."""
        window = slice(-self.config.block_size, None)
        mask = None if attention_mask is None else attention_mask[:, window]
        return {"input_ids": input_ids[:, window], "attention_mask": mask}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache: generate() builds none

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing, as `UncurlConfig.register_for_auto_class`."""

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' files, plus the shims `auto_map` names."""
        super().save_pretrained(save_directory, **kwargs)
        write_shims(save_directory)


AutoConfig.register(MODEL_TYPE, UncurlConfig, exist_ok=True)
AutoModelForCausalLM.register(UncurlConfig, UncurlForCausalLM, exist_ok=True)
register_checkpoint_conversion_mapping(
    MODEL_TYPE, [PrefixChange(prefix_to_add=UncurlForCausalLM.base_model_prefix)], overwrite=True
)
