"""What Sarkar et al. (2024) report, kept for side-by-side comparison (STUDY.md section 6).

Source: Sarkar, Lausen, Cevher, Zha, Brox, Karypis, "Revisiting SMoE Language Models by Evaluating
Inefficiencies with Task Specific Expert Pruning", NeurIPS 2024 ENLSP workshop, PMLR 262:165-181.
Values marked "read off the plot" carry the reading error of a figure (a few per cent).
"""

import pandas as pd

CITATION = (
    "Sarkar, Lausen, Cevher, Zha, Brox, Karypis. Revisiting SMoE Language Models by Evaluating "
    "Inefficiencies with Task Specific Expert Pruning. NeurIPS 2024 ENLSP workshop, "
    "PMLR 262:165-181."
)
BACKBONE_PARAMS = 354e6  # the dense 354M backbone (GPT-2 medium shape)
GPT2_VOCAB = 50257  # GPT-2 BPE, the paper's tokenizer

# Total parameters of 354M+Xe as the paper states them.
TOTAL_PARAMS = {1: 354e6, 8: 1.05e9, 32: 3.4e9, 64: 6.7e9, 128: 13e9}

# Fig. 6: validation loss over pretraining tokens (read off the plot).
PRETRAINING_TOKENS = (5e9, 10e9, 15e9, 20e9, 30e9, 50e9)
PRETRAINING_VAL_LOSS = {
    1: (3.86, 3.48, 3.28, 3.12, 2.98, 2.80),
    8: (3.81, 3.45, 3.22, 3.06, 2.90, 2.72),
    32: (3.70, 3.32, 3.14, 2.99, 2.83, 2.65),
    64: (3.64, 3.28, 3.10, 2.95, 2.80, 2.59),
    128: (3.63, 3.25, 3.08, 2.91, 2.75, 2.56),
}

# Fig. 2b: performance-equivalent dense size of 354M+Xe by Clark et al.'s law (read off the plot).
DENSE_EQUIVALENT = {
    8: 1.0e9, 16: 1.3e9, 32: 1.75e9, 64: 2.35e9, 128: 3.25e9, 256: 4.85e9, 512: 7.8e9,
    1024: 13.5e9,
}


def pretraining_curves() -> pd.DataFrame:
    """Fig. 6 as a tidy table: one row per (n_expert, tokens)."""
    return pd.DataFrame(
        [{"n_expert": n, "tokens": t, "val_loss": loss}
         for n, losses in PRETRAINING_VAL_LOSS.items()
         for t, loss in zip(PRETRAINING_TOKENS, losses, strict=True)]
    )


def dense_equivalent() -> pd.DataFrame:
    """Fig. 2b as a tidy table: n_expert, dense_equivalent (parameters)."""
    return pd.DataFrame(
        {"n_expert": list(DENSE_EQUIVALENT), "dense_equivalent": list(DENSE_EQUIVALENT.values())}
    )
