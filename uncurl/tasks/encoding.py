"""Token ids of a task, and the padded batches a model reads.

A choice example becomes a prompt (text cut to fit + query) and its candidate answers; training
puts the loss on the right answer's tokens only. Documents (an lm task's, or reduction's task
data) are cut into windows of one block of inputs, padded where a document ends.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from uncurl.tasks.registry import Example


class Batch(NamedTuple):
    idx: torch.Tensor  # (B, T) token ids, 0 where padded
    targets: torch.Tensor  # (B, T) next tokens, -1 where there is none
    mask: torch.Tensor  # (B, T) True on real (unpadded) tokens


# ----------------------------------------------------------------------------- choice tasks


@dataclass(frozen=True)
class Encoded:
    prompt: np.ndarray  # token ids of text (cut to fit) + query
    choices: tuple[np.ndarray, ...]
    label: int


def encode(
    tok, exs: list[Example], block_size: int = 10**9, max_text_tokens: int | None = None
) -> list[Encoded]:
    """Token ids of each example, the text cut (to `max_text_tokens`, and so that prompt +
    longest answer fits one block of inputs)."""

    def ids(strings):
        enc = tok.backend_tokenizer.encode_batch(list(strings), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in enc]

    texts = ids(e.text for e in exs)
    queries, answers = {}, {}  # a task repeats the same few queries and answers
    for q in {e.query for e in exs}:
        queries[q] = ids([q])[0]
    for c in {c for e in exs for c in e.choices}:
        answers[c] = ids([c])[0]
    out = []
    for ex, text in zip(exs, texts, strict=True):
        query, choices = queries[ex.query], tuple(answers[c] for c in ex.choices)
        room = block_size + 1 - len(query) - max(len(c) for c in choices)
        if room < 1:
            raise ValueError(
                f"block_size {block_size} leaves no room for a prompt after the "
                f"query {ex.query!r} and answers {ex.choices}"
            )
        text = text[: min(room, max_text_tokens or room)]
        out.append(Encoded(np.concatenate([text, query]), choices, ex.label))
    return out


def answered(encoded: list[Encoded]) -> list[np.ndarray]:
    """Each example as one document, prompt + right answer: task text for reduction statistics."""
    return [np.concatenate([e.prompt, e.choices[e.label]]) for e in encoded]


def answer_batch(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Batch:
    """(prompt, answer) pairs as one right-padded batch whose targets are the answer tokens only."""
    width = max(len(p) + len(a) for p, a in pairs) - 1
    idx = np.zeros((len(pairs), width), dtype=np.int64)
    targets = np.full((len(pairs), width), -1, dtype=np.int64)
    mask = np.zeros((len(pairs), width), dtype=bool)
    for row, (p, a) in enumerate(pairs):
        seq = np.concatenate([p, a])
        idx[row, : len(seq) - 1] = seq[:-1]
        mask[row, : len(seq) - 1] = True
        targets[row, len(p) - 1 : len(seq) - 1] = a
    return Batch(torch.from_numpy(idx), torch.from_numpy(targets), torch.from_numpy(mask))


class Packed(NamedTuple):
    """Prompts with their candidate answers, one prompt per row (`packed_batch`)."""

    idx: torch.Tensor  # (B, T) token ids, 0 where padded
    targets: torch.Tensor  # (B, T) the candidates' tokens, -1 elsewhere
    positions: torch.Tensor | None  # (B, T) each token's position; None: 0..T-1
    attn_mask: torch.Tensor | None  # (B, T, T) True where a token may attend; None: causal
    owner: torch.Tensor  # (n,) each target's candidate, targets in row-major order and the
    # candidates counted over the rows in order


def packed_batch(packs: list[tuple[np.ndarray, tuple[np.ndarray, ...]]]) -> Packed:
    """(prompt, candidates) pairs, each prompt with all its candidates in one row: the prompt
    but its last token, then for each candidate that token again and the candidate but its
    last, at the positions they would have right after the prompt, seeing the prompt and their
    own earlier tokens only. Each candidate token is predicted from the context it has alone,
    and the prompt is computed once. Rows of one candidate are `answer_batch`'s rows."""
    width = max(len(p) - 1 + sum(len(c) for c in cs) for p, cs in packs)
    idx = np.zeros((len(packs), width), dtype=np.int64)
    targets = np.full((len(packs), width), -1, dtype=np.int64)
    positions = np.tile(np.arange(width), (len(packs), 1))
    segment = np.full((len(packs), width), -2)  # -1 the prompt, j the j-th candidate
    owner, counted = [], 0
    for row, (prompt, choices) in enumerate(packs):
        col = len(prompt) - 1
        idx[row, :col], segment[row, :col] = prompt[:-1], -1
        for j, c in enumerate(choices):
            cols = slice(col, col + len(c))
            idx[row, cols] = np.concatenate([prompt[-1:], c[:-1]])
            targets[row, cols], segment[row, cols] = c, j
            positions[row, cols] = np.arange(len(prompt) - 1, len(prompt) - 1 + len(c))
            owner += [counted + j] * len(c)
            col += len(c)
        counted += len(choices)
    packed = torch.from_numpy
    if all(len(cs) == 1 for _, cs in packs):
        return Packed(packed(idx), packed(targets), None, None, torch.tensor(owner))
    seg = packed(segment)
    earlier = torch.ones(width, width, dtype=torch.bool).tril()
    mask = earlier & ((seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None]))
    return Packed(packed(idx), packed(targets), packed(positions), mask, torch.tensor(owner))


def train_batches(
    encoded: list[Encoded], batch_size: int, seed: int, epoch: int = 0, pool: int = 32
):
    """One epoch of training batches (prompt + right answer), shuffled by (seed, epoch). Within
    each pool of `pool` batches' worth of examples, examples of similar length share a batch (less
    padding); the batches are then shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(encoded))
    size = [len(e.prompt) + len(e.choices[e.label]) for e in encoded]
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort([size[j] for j in chunk], kind="stable")]
        batches += [
            chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)
        ]
    for i in rng.permutation(len(batches)):
        yield answer_batch(
            [(encoded[j].prompt, encoded[j].choices[encoded[j].label]) for j in batches[i]]
        )


# -------------------------------------------------------------------------------- documents


def make_batches(
    docs: list[np.ndarray],
    block_size: int,
    batch_size: int,
    max_tokens: int | None = None,
    seed: int = 0,
) -> list[Batch]:
    """Windows of block_size + 1 tokens (stride block_size), shuffled by `seed`, then batched.

    A document's last window is padded; `max_tokens` caps the real tokens taken, so that a reader
    (reduction statistics, an lm task's evaluation) sees a seeded sample rather than the first
    documents.
    """
    windows = [w for d in docs for w in document_windows(d, block_size)]
    order = np.random.default_rng(seed).permutation(len(windows))
    chosen, total = [], 0
    for i in order:
        if max_tokens is not None and total >= max_tokens:
            break
        chosen.append(windows[i])
        total += len(windows[i]) - 1
    return [_pad(chosen[i : i + batch_size], block_size) for i in range(0, len(chosen), batch_size)]


def document_windows(doc: np.ndarray, block_size: int) -> list[np.ndarray]:
    """A document's windows of block_size + 1 tokens, stride block_size, the last one short."""
    return [doc[s : s + block_size + 1] for s in range(0, len(doc) - 1, block_size)]


def unit_batches(
    docs: list[np.ndarray],
    titles: list[str],
    block_size: int,
    batch_size: int,
    max_windows: int,
    unit_windows: int,
    seed: int = 0,
) -> tuple[list[Batch], list[str]]:
    """Up to `max_windows` windows of documents, batched, and each window's unit: a block of
    `unit_windows` consecutive windows of one document, named "i:title:k" (the k-th block of
    the i-th document). Neighbouring windows of a text are correlated, so the bootstrap resamples
    units; they are taken whole, in an order fixed by `seed`, so that the windows spread over
    many units of many documents rather than filling up from the first."""
    units = []
    for i, (doc, title) in enumerate(zip(docs, titles, strict=True)):
        windows = document_windows(doc, block_size)
        units += [
            (f"{i}:{title}:{k}", windows[start : start + unit_windows])
            for k, start in enumerate(range(0, len(windows), unit_windows))
        ]
    chosen = []
    for u in np.random.default_rng(seed).permutation(len(units)):
        chosen += [(units[u][0], w) for w in units[u][1]]
        if len(chosen) >= max_windows:
            break
    chosen = chosen[:max_windows]
    batches = [
        _pad([w for _, w in chosen[i : i + batch_size]], block_size)
        for i in range(0, len(chosen), batch_size)
    ]
    return batches, [name for name, _ in chosen]


def _pad(windows: list[np.ndarray], block_size: int) -> Batch:
    idx = torch.zeros(len(windows), block_size, dtype=torch.long)
    targets = torch.full((len(windows), block_size), -1, dtype=torch.long)
    for row, w in enumerate(windows):
        w = torch.from_numpy(np.asarray(w, dtype=np.int64))
        idx[row, : len(w) - 1] = w[:-1]
        targets[row, : len(w) - 1] = w[1:]
    return Batch(idx, targets, targets >= 0)
