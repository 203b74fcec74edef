"""Configuration: the model's shape and the training recipe, and the profile manifest.

One vocabulary everywhere (config, command line, notebooks, book): `n_expert`, `top_k`,
`capacity_factor`, `aux_loss_weight`. Profiles live in `profiles.toml`, the single source of truth
for every parameter a run uses.
"""

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PROFILES_PATH = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    block_size: int = 128  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    d_ff: int = 0  # FFN / expert hidden width; 0 means 4 * n_embd
    # Experts per MoE layer: 1 is the dense backbone; a list gives one count per MoE layer
    # (reduced models may differ between layers).
    n_expert: int | tuple[int, ...] = 1
    top_k: int = 1
    moe_every: int = 2  # MoE replaces every `moe_every`-th FFN, starting with layer 0 (GLaM)
    capacity_factor: float | None = 1.2  # training; None = dropless
    eval_capacity_factor: float | None = 1.0  # evaluation; None = dropless
    min_capacity: int = 4
    aux_loss_weight: float = 0.01
    router_init_std: float = 0.02
    bias: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.n_expert, list):
            object.__setattr__(self, "n_expert", tuple(self.n_expert))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        counts = self.n_expert if isinstance(self.n_expert, tuple) else (self.n_expert,)
        if isinstance(self.n_expert, tuple) and len(counts) != len(self.moe_layers):
            raise ValueError(
                f"n_expert lists {len(counts)} counts but the model has "
                f"{len(self.moe_layers)} MoE layers {self.moe_layers}; give one per MoE layer"
            )
        if min(counts) < 1:
            raise ValueError(f"n_expert must be >= 1, got {self.n_expert}")
        if not 1 <= self.top_k <= min(counts) and self.is_moe:
            raise ValueError(f"top_k={self.top_k} must be between 1 and the expert count {counts}")

    @property
    def hidden(self) -> int:
        return self.d_ff or 4 * self.n_embd

    @property
    def is_moe(self) -> bool:
        return isinstance(self.n_expert, tuple) or self.n_expert > 1

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(range(0, self.n_layer, self.moe_every))

    def experts_at(self, layer: int) -> int:
        """Experts in `layer`'s FFN (0 when the layer has a dense FFN)."""
        if not self.is_moe or layer not in self.moe_layers:
            return 0
        if isinstance(self.n_expert, tuple):
            return self.n_expert[self.moe_layers.index(layer)]
        return self.n_expert

    def capacity(self, n_tokens: int, n_expert: int, training: bool) -> int | None:
        """Tokens each expert may take: Switch's capacity factor rule, None when dropless."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        if factor is None:
            return None
        return max(self.min_capacity, math.ceil(factor * n_tokens * self.top_k / n_expert))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.n_expert, tuple):
            d["n_expert"] = list(self.n_expert)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**_known(cls, d, "model"))


@dataclass(frozen=True)
class OptimConfig:
    """What pretraining and fine-tuning share: AdamW, linear warm-up and decay, gradient
    clipping, the evaluation interval and torch threads."""
    max_steps: int = 400
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # linear decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 100
    threads: int = 1


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    batch_size: int = 32
    eval_batches: int = 20
    ckpt_interval: int = 100
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**_known(cls, d, "train"))


@dataclass(frozen=True)
class FinetuneConfig(OptimConfig):
    """Fine-tuning on a task: the optimiser's fields plus early stopping and task sizes.

    `max_steps` is an upper bound: every `eval_interval` steps the held-out loss (a part of the
    training split) is measured, the best weights are kept, and training stops after `patience`
    evaluations without improvement. `lr` is shared by every model being compared. A batch holds
    about `batch_tokens` tokens: as many examples (lm: windows) as fit at their mean length, so
    that every task costs the same per step. Each run takes its seed, 0 to `seeds` - 1."""
    batch_tokens: int = 1024
    max_steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 50
    patience: int = 3
    seeds: int = 3  # fine-tuning seeds per (model, task)
    val_frac: float = 0.2  # choice tasks: share of examples for validation
    heldout_frac: float = 0.1  # share of examples (lm: training documents) for early stopping
    max_val: int = 1000  # validation examples scored (a stable subset)
    max_val_windows: int = 256  # lm tasks: validation windows of block_size tokens scored
    max_heldout: int = 128  # held-out examples (lm: windows) for early stopping
    router_warmup_steps: int = 20  # reduced models: router-only steps on the task first
    router_warmup_lr: float = 1e-3
    reduce_tokens: int = 65536  # task tokens for the reduction statistics

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        return cls(**_known(cls, d, "finetune"))


@dataclass(frozen=True)
class Profile:
    name: str
    data: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    expert_counts: tuple[int, ...] = (1,)
    finetune: dict = field(default_factory=dict)
    task_finetune: dict = field(default_factory=dict)  # {task: overrides of `finetune` for it}
    tasks: tuple[str, ...] = ()  # fine-tuning tasks of the study
    appendix_tasks: tuple[str, ...] = ()  # paper-like tasks kept in an appendix table
    task_source: str = ""  # folder standing in for the task packages (tests); "" = fetch them
    reductions: tuple[dict, ...] = ()  # {source = Z, target = D, methods = [...]} to fine-tune

    @property
    def data_dir(self) -> Path:
        """Where `python -m uncurl.data prepare` writes this profile's token arrays."""
        return Path("data/prepared") / self.data.get("name", self.name)

    @property
    def all_tasks(self) -> tuple[str, ...]:
        return self.tasks + self.appendix_tasks

    def model_config(self, **overrides) -> ModelConfig:
        return ModelConfig.from_dict({**self.model, **overrides})

    def train_config(self, **overrides) -> TrainConfig:
        return TrainConfig.from_dict({**self.train, **overrides})

    def finetune_config(self, task: str | None = None, **overrides) -> FinetuneConfig:
        """The fine-tuning recipe, for `task` if the profile adjusts it for that task (the same
        for every model compared on it)."""
        return FinetuneConfig.from_dict({**self.finetune, **self.task_finetune.get(task, {}),
                                         **overrides})


def _known(cls, d: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {unknown}; known: {sorted(names)}")
    return dict(d)


STUDY_KEY = "study"  # the [[study]] tables of profiles.toml: the study's steps, not a profile


def load_profiles(path: Path = PROFILES_PATH) -> dict[str, Profile]:
    raw = tomllib.loads(Path(path).read_text())
    return {
        name: Profile(
            name=name,
            data=spec.get("data", {}),
            model=spec.get("model", {}),
            train=spec.get("train", {}),
            expert_counts=tuple(spec.get("expert_counts", [1])),
            finetune=spec.get("finetune", {}),
            task_finetune=spec.get("task_finetune", {}),
            tasks=tuple(spec.get("tasks", [])),
            appendix_tasks=tuple(spec.get("appendix_tasks", [])),
            task_source=spec.get("task_source", ""),
            reductions=tuple(spec.get("reductions", [])),
        )
        for name, spec in raw.items()
        if name != STUDY_KEY
    }


def load_study(path: Path = PROFILES_PATH) -> list[dict]:
    """The study's steps (`[[study]]` in profiles.toml), as written; `uncurl.study` runs them."""
    return tomllib.loads(Path(path).read_text()).get(STUDY_KEY, [])


def get_profile(name: str) -> Profile:
    profiles = load_profiles()
    if name not in profiles:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(profiles)}")
    return profiles[name]


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs with values parsed as JSON where possible (numbers, null, lists)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not of the form KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
