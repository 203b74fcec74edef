"""lm-evaluation-harness scores a smoke-profile study model on our labelled tasks as we do:
the same examples, prompts and answers, and the same accuracy, example by example; where they
could differ (lm-eval tokenises text, we score ids), the examples are named with the reason."""

import numpy as np
import pytest

from uncurl import data, harness, tasks
from uncurl.config import get_profile
from uncurl.train import train

SMOKE = get_profile("smoke")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smoke_model(smoke_data, tmp_path_factory):
    """A smoke-profile model as the study pretrains it."""
    out = tmp_path_factory.mktemp("run") / "e4"
    model = SMOKE.model_config(n_expert=4, vocab_size=320)
    train(out, model, SMOKE.train_config(), smoke_data, progress=False)
    return out


def test_lm_eval_gives_our_accuracy_on_every_example(smoke_model, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")
    table = harness.cross_check(smoke_model, SMOKE, out=tmp_path)
    assert list(table["task"]) == [t for t in SMOKE.all_tasks if tasks.get_task(t).kind == "choice"]
    for row in table.itertuples():
        assert row.prompts_as_written, f"{row.task}: lm-eval scored other prompts or answers"
        # our model on lm-eval's token ids gives lm-eval's answer on every example
        assert row.ours_on_their_ids_agree == row.examples, row.task
        # so where lm-eval and we differ, it is its tokenisation of our prompt + answer text
        assert row.differ_tokenised_alike == [], (
            f"{row.task}: examples {row.differ_tokenised_alike} (doc_id) differ though lm-eval "
            "tokenised them as we do"
        )
        assert row.differ == [], (
            f"{row.task}: lm-eval and we differ on examples {row.differ} (doc_id), which it "
            "tokenises otherwise (a prompt cut inside a word or a character, re-encoded)"
        )
        assert row.ours == row.lm_eval


def test_an_example_lm_eval_tokenises_otherwise_is_found(smoke_data):
    """A prompt cut inside a word decodes to text whose tokens are not the cut ones; so do ids
    that are not the tokenizer's own encoding of their text, as here: " the" spelled by byte."""
    tok = data.load_tokenizer(smoke_data)
    query, answer = tok.encode("\nSentiment:"), tok.encode(" positive")
    word = tok.encode("Review: the")
    spelled = tok.convert_tokens_to_ids(list("\u0120the"))  # byte-level BPE's space, t, h, e
    assert len(word) < len(tok.encode("Review:")) + len(spelled)  # the tokenizer merges them
    for text, alike in ((word, True), (tok.encode("Review:") + spelled, False)):
        e = tasks.Encoded(np.array(text + query), (np.array(answer),), 0)
        (doc,) = harness.as_text(tok, [e])
        assert doc["prompt"] == "Review: the\nSentiment:" and doc["choices"] == [" positive"]
        pairs = harness.lm_eval_pairs(tok, doc, block_size=64)
        assert harness.tokenised_alike(pairs, e) is alike
