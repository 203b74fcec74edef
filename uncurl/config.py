"""Configuration: the model's shape and the training recipe, and the profile manifest.

One vocabulary everywhere (config, command line, notebooks, book): `n_expert`, `top_k`,
`capacity_factor`, `aux_loss_weight`. Profiles live in `profiles.toml`, the single source of truth
for every parameter a run uses.
"""

import contextvars
import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from uncurl import layout

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
    # Per MoE layer, the expert each router output dispatches to, several outputs sharing one
    # (HC-SMoE's tied experts, `hcsmoe-tied`); () = one router output per expert.
    tied_experts: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if isinstance(self.n_expert, list):
            object.__setattr__(self, "n_expert", tuple(self.n_expert))
        object.__setattr__(self, "tied_experts", tuple(tuple(t) for t in self.tied_experts))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        counts = self.n_expert if isinstance(self.n_expert, tuple) else (self.n_expert,)
        if isinstance(self.n_expert, tuple) and len(counts) != len(self.moe_layers):
            raise ValueError(
                f"n_expert lists {len(counts)} counts but the model has "
                f"{len(self.moe_layers)} MoE layers {self.moe_layers}; give one per MoE layer"
            )
        if min(counts) < 1:
            raise ValueError(
                f"n_expert must be at least 1 (1 is the dense model), got {self.n_expert}"
            )
        if not 1 <= self.top_k <= min(counts) and self.is_moe:
            raise ValueError(
                f"top_k={self.top_k} must be between 1 and the number of experts "
                f"({min(counts)}): lower top_k or give more experts"
            )
        if self.tied_experts:
            self._check_ties()

    def _check_ties(self) -> None:
        if len(self.tied_experts) != len(self.moe_layers):
            raise ValueError(
                f"tied_experts lists {len(self.tied_experts)} layers but the model has "
                f"{len(self.moe_layers)} MoE layers; give one map per MoE layer"
            )
        for layer, ties in zip(self.moe_layers, self.tied_experts, strict=True):
            if sorted(set(ties)) != list(range(self.experts_at(layer))):
                raise ValueError(
                    f"tied_experts of layer {layer} must point its router outputs at each of "
                    f"its {self.experts_at(layer)} experts, got {list(ties)}"
                )

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

    def ties_at(self, layer: int) -> tuple[int, ...] | None:
        """The expert each router output of `layer` dispatches to, if its experts are tied."""
        if not self.tied_experts or layer not in self.moe_layers:
            return None
        return self.tied_experts[self.moe_layers.index(layer)]

    def router_outputs(self, layer: int) -> int:
        """Router outputs of `layer`'s FFN: one per expert, unless its experts are tied."""
        ties = self.ties_at(layer)
        return self.experts_at(layer) if ties is None else len(ties)

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
        if self.tied_experts:
            d["tied_experts"] = [list(t) for t in self.tied_experts]
        else:
            del d["tied_experts"]  # so that an untied model's records are as they always were
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**checked(cls, d, "model"))


@dataclass(frozen=True)
class OptimConfig:
    """What pretraining and fine-tuning share: AdamW, linear warm-up and decay, gradient
    clipping, the evaluation interval, torch threads, and the device and precision
    (`uncurl.device`: "auto" is a GPU in bf16 where there is one, else the CPU in fp32)."""

    max_steps: int = 400
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # linear decay to lr * min_lr_ratio
    lr_warmup_steps: int = 50  # linear learning-rate warm-up (not the router warm-up)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 100
    threads: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | bf16 | fp32

    def __post_init__(self):
        for name in ("max_steps", "lr", "eval_interval", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr_warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("lr_warmup_steps and weight_decay must be >= 0 and grad_clip > 0")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(
                f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)} or cuda:N"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    """Pretraining. `batch_size` is the global batch of a step; each device runs it in
    micro-batches of `micro_batch_size` rows and accumulates their gradients, so accumulation
    = batch_size / (micro_batch_size x data-parallel processes). An MoE layer's capacity and
    load-balancing loss are those of a micro-batch on one device, as in DeepSpeed.

    `engine` "deepspeed" trains under DeepSpeed (`uncurl.distributed`): ZeRO stage
    `zero_stage`, each MoE layer's experts split over `ep_size` processes."""

    batch_size: int = 32
    micro_batch_size: int = 0  # rows per device per forward pass; 0 = the device's whole share
    eval_batches: int = 20
    ckpt_interval: int = 100
    seed: int = 0
    engine: str = "torch"  # torch (one process) | deepspeed
    zero_stage: int = 2  # DeepSpeed's ZeRO stage: 1 or 2 (3 refuses MoE layers)
    ep_size: int = 1  # processes each MoE layer's experts are split over (DeepSpeed)

    def __post_init__(self):
        super().__post_init__()
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.zero_stage not in (1, 2):
            raise ValueError(
                f"zero_stage must be 1 or 2, got {self.zero_stage} (stage 3 refuses MoE layers; "
                "stage 0 clips expert-parallel gradients by a mean of per-process norms)"
            )
        if self.ep_size < 1 or (self.ep_size > 1 and self.engine != "deepspeed"):
            raise ValueError(f"ep_size={self.ep_size} needs engine 'deepspeed' (and must be >= 1)")
        self.micro_batch(1)

    def micro_batch(self, world: int) -> int:
        """Rows each of `world` data-parallel processes runs per forward pass."""
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} does not split over {world} processes")
        share = self.batch_size // world
        micro = self.micro_batch_size or share
        if micro < 0 or share % micro:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} must divide each process's share of "
                f"the batch ({self.batch_size} / {world} = {share} rows)"
            )
        return micro

    def accumulation(self, world: int) -> int:
        """Micro-batches whose gradients each process accumulates per step."""
        return self.batch_size // (world * self.micro_batch(world))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**checked(cls, d, "train"))


@dataclass(frozen=True)
class ReduceConfig:
    """How a reduction runs, beside its method and target: router handling, weight-matching
    solver, seed (sampling, clustering, `random`, router initialisation), the task tokens the
    statistics read, and the router warm-up on the task data afterwards."""

    router: str | None = None  # None: "keep" pruning, "tie" hcsmoe-tied, "reinit" merging
    solver: str = "hungarian"  # weight matching: "hungarian" (exact) or "greedy"
    seed: int = 0
    max_tokens: int = 65536  # task tokens for the statistics (a seeded sample of windows)
    batch_size: int = 32  # windows per statistics batch
    # router-only training steps after the reduction, when the router is new (reinit, merge):
    # scored as it is, a re-initialised router routes at random
    router_warmup_steps: int = 50
    router_warmup_lr: float = 1e-3
    kmeans_n_init: int = 10  # UNCURL's K-means: restarts (the best inertia is kept)
    kmeans_max_iter: int = 300  # and iterations per restart

    @classmethod
    def from_dict(cls, d: dict) -> "ReduceConfig":
        return cls(**checked(cls, d, "reduction"))


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
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 50
    patience: int = 3
    seeds: int = 3  # fine-tuning seeds per (model, task)
    val_frac: float = 0.2  # choice tasks: share of examples for validation
    heldout_frac: float = 0.1  # share of examples (lm: training documents) for early stopping
    max_val: int = 1000  # validation examples scored (a stable subset)
    max_val_windows: int = 256  # lm tasks: validation windows of block_size tokens scored
    # lm tasks: consecutive windows of a validation document that form one bootstrap unit; with
    # max_val_windows, at least 32 units per domain (the bootstrap needs units, not windows:
    # drama's windows come from 2 documents)
    val_unit_windows: int = 8
    # held-out examples (lm: windows) for early stopping and, for labelled tasks, for deciding
    # whether a task is learned: at 128 a binomial interval of accuracy is about +-8 points, as
    # wide as the margin over the majority share it has to show (rotten_tomatoes: 65-67% against
    # 57%); at 256 about +-6, at twice the cost of each held-out evaluation (for an lm task at
    # small, estimated from tokens: about a fifth of the training work between evaluations)
    max_heldout: int = 256
    router_warmup_steps: int = 20  # reduced models: router-only steps on the task first
    router_warmup_lr: float = ReduceConfig.router_warmup_lr
    reduce_tokens: int = ReduceConfig.max_tokens  # task tokens for the reduction statistics

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        return cls(**checked(cls, d, "finetune"))


@dataclass(frozen=True)
class DataConfig:
    """What a prepared corpus folder depends on; its meta.json records these as `params`."""

    source: str = "bundled"  # bundled | NAME[,NAME] | PATH | hf:NAME
    tokenizer: str = "bpe"  # "bpe" (trained on the training split) or "gpt2"
    vocab_size: int = 4096  # bpe only
    seed: int = 0  # salts the document split
    val_frac: float = 0.05
    test_frac: float = 0.05
    max_chars_per_domain: int | None = None  # cap on each domain's training text

    def __post_init__(self):
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {self.tokenizer!r}: choose one of {TOKENIZERS}")

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return cls(**checked(cls, d, "preparation"))


TOKENIZERS = ("bpe", "gpt2")
ENGINES = ("torch", "deepspeed")
DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N", one GPU
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class InferenceBenchConfig:
    """Sizes of `python -m uncurl.bench inference`: tokens per process = batch_size x seq_len,
    for one MoE layer and the whole model alike."""

    batch_size: int = 4
    seq_len: int = 128
    repeats: int = 15  # timed runs per measurement (median and quartiles)
    warmup_runs: int = 3  # discarded runs before timing
    procs: tuple[int, ...] = (1, 2, 4)  # expert-parallel process counts P
    expert_counts: tuple[int, ...] = (4, 8, 16, 32, 64)  # the one-layer sweep
    exchange_kib: tuple[int, ...] = (4, 32, 256, 1024, 4096)  # bare all_to_all sizes
    deepspeed: bool = True  # also time DeepSpeed's MoE layer

    @classmethod
    def from_dict(cls, d: dict) -> "InferenceBenchConfig":
        return cls(**checked(cls, d, "inference_bench"))


@dataclass(frozen=True)
class Profile:
    """One profile of profiles.toml: every parameter of a study, checked when it is loaded."""

    name: str
    data: dict = field(default_factory=dict)  # DataConfig's fields and the folder `name`
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    expert_counts: tuple[int, ...] = (1,)
    # pretraining seeds of every expert count; fine-tuning seed s starts from pretraining seed
    # pretrain_seeds[s % len] (its reductions too), so the seeds replicate pretraining as well
    pretrain_seeds: tuple[int, ...] = (0,)
    finetune: dict = field(default_factory=dict)
    task_finetune: dict = field(default_factory=dict)  # {task: overrides of `finetune` for it}
    tasks: tuple[str, ...] = ()  # fine-tuning tasks of the study
    appendix_tasks: tuple[str, ...] = ()  # paper-like tasks kept in an appendix table
    task_source: str = ""  # folder standing in for the task packages (tests); "" = fetch them
    # {source_n_expert = Z, target_n_expert = D, methods = [...]}: the reductions fine-tuned
    reductions: tuple[dict, ...] = ()
    inference_bench: dict = field(default_factory=dict)  # InferenceBenchConfig's fields

    def __post_init__(self):
        """Build every config once, so that an unknown or mistyped key fails at load time (these
        reads are not the process reading its profile: see `profile_fields_read`)."""
        checking = _recording.set(False)
        try:
            self.model_config(), self.train_config(), self.data_config(), self.bench_config()
            for task in (None, *self.task_finetune):
                self.finetune_config(task)
            for spec in self.reductions:
                checked(Reduction, spec, "reductions")
            if not self.pretrain_seeds or len(set(self.pretrain_seeds)) < len(self.pretrain_seeds):
                raise ValueError(
                    f"profile {self.name!r}: pretrain_seeds = {list(self.pretrain_seeds)} must "
                    f"list distinct seeds, at least one (e.g. [0, 1])"
                )
        finally:
            _recording.reset(checking)

    def __getattribute__(self, name):
        if name in PROFILE_FIELDS and _recording.get():
            _fields_read.add(name)
        return object.__getattribute__(self, name)

    @property
    def data_dir(self) -> Path:
        """Where `python -m uncurl.data prepare` writes this profile's token arrays."""
        return layout.prepared_dir(self.data.get("name", self.name))

    def pretrain_seed(self, seed: int) -> int:
        """The pretraining seed of the models fine-tuning seed `seed` starts from."""
        return self.pretrain_seeds[seed % len(self.pretrain_seeds)]

    @property
    def all_tasks(self) -> tuple[str, ...]:
        return self.tasks + self.appendix_tasks

    def data_config(self) -> DataConfig:
        return DataConfig.from_dict({k: v for k, v in self.data.items() if k != "name"})

    def model_config(self, **overrides) -> ModelConfig:
        return ModelConfig.from_dict({**self.model, **overrides})

    def train_config(self, **overrides) -> TrainConfig:
        return TrainConfig.from_dict({**self.train, **overrides})

    def finetune_config(self, task: str | None = None, **overrides) -> FinetuneConfig:
        """The fine-tuning recipe, for `task` if the profile adjusts it for that task (the same
        for every model compared on it)."""
        return FinetuneConfig.from_dict(
            {**self.finetune, **self.task_finetune.get(task, {}), **overrides}
        )

    def bench_config(self, **overrides) -> InferenceBenchConfig:
        return InferenceBenchConfig.from_dict({**self.inference_bench, **overrides})


PROFILE_FIELDS = frozenset(f.name for f in dataclasses.fields(Profile))
_fields_read: set[str] = set()
_recording = contextvars.ContextVar("recording", default=True)


def profile_fields_read() -> list[str]:
    """The fields of the profiles this process has read (beyond checking them when it loaded
    them): a study run's record lists them, so that a change to any other field of its profile
    leaves the run up to date."""
    return sorted(_fields_read)


@dataclass(frozen=True)
class Reduction:
    """One entry of a profile's `reductions`: Z -> D experts per MoE layer by each method."""

    source_n_expert: int
    target_n_expert: int
    methods: tuple[str, ...]


# --------------------------------------------------------------------------- checked fields


def checked(cls, d: dict, what: str) -> dict:
    """`d` as keyword arguments of dataclass `cls`: every key a field (else the error names the
    closest one), every value of the field's type (lists become tuples where the field is one)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in d.items():
        if key not in hints:
            raise ValueError(
                f"unknown {what} key {key!r}{closest(key, hints)}; known: {', '.join(hints)}"
            )
        if not _conforms(value, hints[key]):
            raise ValueError(f"{what} key {key!r} must be {_type_name(hints[key])}, got {value!r}")
        out[key] = tuple(value) if isinstance(value, list) and _is_tuple(hints[key]) else value
    return out


def closest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _conforms(value, tp) -> bool:
    """Whether `value` (as TOML or JSON gives it) fits annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, t) for t in typing.get_args(tp))
    if origin in (tuple, list):
        item = typing.get_args(tp)[0]
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _is_tuple(tp) -> bool:
    return any(typing.get_origin(t) is tuple for t in (tp, *typing.get_args(tp)))


def _type_name(tp) -> str:
    """`int`, `int | None`, `tuple[int, ...]` (a generic's __name__ would drop its items)."""
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


# ------------------------------------------------------------------------------ the manifest

STUDY_KEY = "study"  # the [[study]] tables of profiles.toml: the study's steps, not a profile


def load_profiles(path: Path = PROFILES_PATH) -> dict[str, Profile]:
    """Every profile of the manifest, each checked key by key."""
    raw = tomllib.loads(Path(path).read_text())
    return {
        name: Profile(name=name, **checked(Profile, spec, f"profile {name!r}"))
        for name, spec in raw.items()
        if name != STUDY_KEY
    }


def load_study(path: Path = PROFILES_PATH) -> list[dict]:
    """The study's steps (`[[study]]` in profiles.toml), as written; `uncurl.study` runs them."""
    return tomllib.loads(Path(path).read_text()).get(STUDY_KEY, [])


def get_profile(name: str) -> Profile:
    profiles = load_profiles()
    if name not in profiles:
        raise ValueError(
            f"unknown profile {name!r}{closest(name, profiles)}; choose one of "
            f"{', '.join(sorted(profiles))}"
        )
    return profiles[name]


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs with values parsed as JSON where possible (numbers, null, lists); the
    config classes check each value's type when they are built from them."""
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
