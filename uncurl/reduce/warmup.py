"""Router warm-up (the last step of UNCURL in the book's Method chapter): after a reduction,
train only the routers for a few steps on the task data, every other parameter frozen, before
the whole model is fine-tuned."""

import torch

from uncurl.reduce.adapter import adapt


def router_warmup(
    model, batches, steps: int, lr: float = 1e-3, grad_clip: float = 1.0
) -> list[float]:
    """Train the routers of `model` (our GPT, a transformers MoE model or their adapter) in place
    for `steps` steps, cycling through `batches` (tasks.Batch); returns the loss (LM + weighted
    load-balancing) of each step. Training mode, so capacity and dropping are as in fine-tuning."""
    if steps == 0:
        return []
    adapter = adapt(model)
    model, routers = adapter.model, adapter.router_parameters()
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(any(p is r for r in routers))
    opt = torch.optim.AdamW(routers, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            loss = adapter.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(routers, grad_clip)
            opt.step()
            losses.append(loss.item())
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.eval()
    return losses
