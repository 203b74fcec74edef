"""How a training step runs in one process: micro-batches, their gradients accumulated, clipping,
AdamW, and the optimizer's part of a checkpoint. `uncurl.distributed` runs the same steps under
DeepSpeed over P processes, overriding what differs.

A step takes the global batch (x, y) of `batch_size` rows; each process runs its share of it in
micro-batches of `micro_batch_size` rows (`TrainConfig.micro_batch`), and the loss of a micro-batch
is divided by their number, so that the accumulated gradient is that of the mean loss. MoE layers
see one micro-batch at a time: their capacity and load-balancing loss are a micro-batch's.
"""

import torch

from uncurl.config import TrainConfig
from uncurl.device import autocast, describe, micro_batches, resolve_device, resolve_precision
from uncurl.model import GPT, eval_mode, kernels
from uncurl.model.checkpoint import load_train_state, load_weights, save_checkpoint
from uncurl.optim import make_optimizer

LOSSES = ("loss", "lm_loss", "aux_loss")


class Engine:
    """One process: the model on `cfg.device` in `cfg.precision` (bf16 as autocast), AdamW."""

    name, rank, world = "torch", 0, 1

    def __init__(self, model: GPT, cfg: TrainConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.micro_batch = cfg.micro_batch(self.world)
        self.accumulation = cfg.accumulation(self.world)
        self.model = model.to(self.device)
        self.opt = make_optimizer(self.model, cfg)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files."""
        return self.rank == 0

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict:
        """One optimizer step on the global batch; the mean losses and the gradient norm."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        sums = torch.zeros(len(LOSSES), device=self.device)
        for xm, ym in micro_batches(*self.share(x, y), self.micro_batch):
            out = self.forward(xm, ym)
            self.backward(out.loss)
            sums += torch.stack([getattr(out, name) for name in LOSSES]).detach().float()
        grad_norm = self.finish_step()
        means = self.sum_over_processes(sums) / (self.accumulation * self.world)
        return {**dict(zip(LOSSES, means.tolist(), strict=True)), "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean language-modelling loss (no aux loss) over the batches' micro-batches, at
        evaluation capacity."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, count
        with eval_mode(self.model):
            for x, y in batches:
                for xm, ym in micro_batches(*self.share(x, y), self.micro_batch):
                    total[0] += self.forward(xm, ym).lm_loss
                    total[1] += 1
        loss, count = self.sum_over_processes(total).tolist()
        return loss / count

    def share(self, x, y):
        """This process's rows of a global batch."""
        return x, y

    def forward(self, x, y):
        with autocast(self.device, self.precision):
            return self.model(x.to(self.device), y.to(self.device))

    def backward(self, loss):
        (loss / self.accumulation).backward()

    def finish_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return norm.item()

    def sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def describe(self) -> dict:
        """Where and how it trains, for the run's summary."""
        return describe(
            self.device,
            self.precision,
            engine=self.name,
            world=self.world,
            micro_batch_size=self.micro_batch,
            accumulation=self.accumulation,
            moe_kernels=kernels.backend(self.device.type),
        )

    # ------------------------------------------------------------------------- checkpoints

    def save(self, path, tokenizer, info: dict, state: dict) -> None:
        """The checkpoint folder (atomically): weights, config, tokenizer, and for resuming
        `state` with the optimizer and the random state."""
        state = {**state, "optimizer": self.opt.state_dict(), **self.rng_state()}
        save_checkpoint(path, self.model, tokenizer, info, state)

    def load_train_state(self, out) -> dict | None:
        """The training state of run folder `out`'s checkpoint, if it has one."""
        return load_train_state(out)

    def restore(self, path, state: dict) -> None:
        """Continue from the checkpoint at `path` whose training state is `state`."""
        self.model.load_state_dict(load_weights(path))
        self.opt.load_state_dict(state["optimizer"])
        self.set_rng_state(state)

    def rng_state(self) -> dict:
        state = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
