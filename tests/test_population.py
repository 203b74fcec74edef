"""A population trains, evaluates and scores every member exactly as the member alone: the same
losses at every step, the same final weights, the same per-example scores, to the bit."""

from pathlib import Path

import numpy as np
import pytest
import torch

from uncurl import data, evaluate, population, tasks
from uncurl.config import get_profile
from uncurl.model import GPT
from uncurl.model.population import clip_grad_norms, member_state, stack

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = str(ROOT / "tests" / "fixtures" / "tasks")
# patience 1 with an evaluation every 4 steps and a large learning rate: the members stop at
# different steps, and the population goes on without them
RECIPE = dict(max_steps=40, eval_interval=4, patience=1, batch_tokens=256, max_val=40)

pytestmark = pytest.mark.usefixtures("one_thread")


def _models(n_expert=4) -> list[GPT]:
    cfg = get_profile("smoke").model_config(vocab_size=320, n_expert=n_expert)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(GPT(cfg))
    return models


def _task(name, smoke_data, cfg):
    tok = data.load_tokenizer(smoke_data)
    return tasks.load_task(name, tok, 32, cfg, smoke_data, SAMPLES)


@pytest.mark.parametrize(("task", "lr"), [("rotten_tomatoes", 3e-2), ("drama", 1e-2)])
def test_every_member_trains_and_scores_as_it_does_alone(smoke_data, task, lr):
    cfg = get_profile("smoke").finetune_config(task, **RECIPE, lr=lr)
    d = _task(task, smoke_data, cfg)
    starts = _models()
    members = [(m, seed) for m in starts for seed in (0, 1)]  # two models x two seeds
    pop, records = population.train([m for m, _ in members], d, cfg, [s for _, s in members])
    pop_scores = evaluate.member_scores(pop, d)
    assert len({r["steps"] for r in records}) > 1, "members should stop at different steps"
    for i, (start, seed) in enumerate(members):
        alone = GPT(start.cfg)
        alone.load_state_dict(start.state_dict())
        alone, (record,) = population.train([alone], d, cfg, [seed])
        assert records[i] == record  # losses at every step, curve, best step, stop
        for k, v in alone.state_dict().items():
            assert torch.equal(member_state(pop, i)[k], v), k
        assert pop_scores[i] == evaluate.score(alone, d)


def test_members_of_different_widths_get_their_own_gradients(smoke_data):
    """Tokens past a member's own batch width are never routed nor counted in its capacity;
    its padding inside its width is, as alone."""
    cfg = get_profile("smoke").finetune_config("rotten_tomatoes", batch_tokens=256)
    d = _task("rotten_tomatoes", smoke_data, cfg)
    models = [m.train() for m in _models()]
    batches = [  # 7 examples each, cut to 6..12 and 14..20 prompt tokens (padding inside)
        tasks.answer_batch(
            [(e.prompt[-(cut + i) :], e.choices[e.label]) for i, e in enumerate(d.train[:7])]
        )
        for cut in (6, 14)
    ]
    assert batches[0].idx.shape[1] < batches[1].idx.shape[1] and not batches[0].mask.all()
    pop = stack(models).train()
    losses = population.task_losses(pop, batches, "choice")
    losses.sum().backward()
    clip_grad_norms(pop, 0.1)
    for m, (model, b) in enumerate(zip(models, batches, strict=True)):
        loss = population.task_losses(model, [b], "choice")
        loss.sum().backward()
        clip_grad_norms(model, 0.1)
        assert torch.equal(loss[0], losses[m])
        for (name, p), q in zip(pop.named_parameters(), model.parameters(), strict=True):
            assert torch.equal(p.grad[m], q.grad), name


def test_a_shared_batch_scores_every_member_as_alone(smoke_data):
    cfg = get_profile("smoke").finetune_config("rotten_tomatoes")
    d = _task("rotten_tomatoes", smoke_data, cfg)
    models = _models()
    scores = evaluate.choice_scores(stack(models), d.val)
    assert scores.shape[0] == 2
    for m, model in enumerate(models):
        np.testing.assert_array_equal(scores[m], evaluate.choice_scores(model, d.val))


def test_packed_candidates_score_as_one_row_per_candidate(smoke_data):
    """All of an example's candidates in one row score what each scores in a row of its own."""
    cfg = get_profile("smoke").finetune_config("rotten_tomatoes")
    d = _task("rotten_tomatoes", smoke_data, cfg)
    model = _models()[0]
    packed = evaluate.choice_scores(model, d.val)
    pairs = [(e.prompt, c) for e in d.val for c in e.choices]
    one_each = evaluate.answer_logliks(model, pairs).reshape(packed.shape)
    np.testing.assert_allclose(packed, one_each, rtol=0, atol=1e-4)


def test_members_must_share_shapes():
    small, other = _models(n_expert=4)[0], _models(n_expert=2)[0]
    with pytest.raises(ValueError, match="same shapes"):
        stack([small, other])
