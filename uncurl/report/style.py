"""One look for every chapter: figure style, colours and labels, number formats, tables.

Figures are `matplotlib.figure.Figure` objects (no pyplot state, so nothing is shown twice);
`save_figure` writes a PNG and returns an image that MyST-NB's `glue` can paste into the book.
"""

import io
import math

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Image
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from uncurl import layout

LOSS_LABEL = "validation loss (nats per token)"


def use_style() -> None:
    """One look for every figure of the book: readable at book width."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight"})


def expert_label(n_expert: int) -> str:
    return "dense" if n_expert == 1 else f"{n_expert} experts"


def expert_color(n_expert: int):
    """The same colour for an expert count in every figure (dense is black)."""
    if n_expert == 1:
        return (0.1, 0.1, 0.1)
    return mpl.colormaps["viridis"](min(math.log2(n_expert) - 1, 6) / 6 * 0.95)  # 2 to 128


# one colour per method in every chapter: seaborn's colourblind palette in a fixed order, and a
# method's variant (HC-SMoE's own merge) a lighter shade of the method it varies
METHODS = (
    "scratch",
    "uncurl",
    "greedy",
    "greedy-first",
    "freq-merge",
    "mcsmoe",
    "hcsmoe",
    "reap",
    "naee",
    "random",
)
VARIANTS = {"hcsmoe-tied": "hcsmoe"}


def method_color(method: str):
    """The same colour for a reduction method in every figure (from scratch first)."""
    palette = sns.color_palette("colorblind", len(METHODS))
    if method in VARIANTS:
        return tuple(0.45 * c + 0.55 for c in method_color(VARIANTS[method]))
    return palette[METHODS.index(method)] if method in METHODS else (0.5, 0.5, 0.5)


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def plain_axis(axis, fmt=lambda v: f"{v:g}") -> None:
    """Tick labels as plain numbers ('8', '0.9', '1.2M') instead of powers on log axes."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(NullFormatter())


def listing(items) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def expert_range(counts) -> str:
    """The range of the MoE expert counts among `counts`: (1, 8, 32, 128) -> '8 to 128'."""
    moe = sorted(n for n in counts if n > 1)
    return f"{moe[0]} to {moe[-1]}"


def display_table(df: pd.DataFrame, formats: dict | str | None = None):
    """A table for the book: no index, no column that is empty throughout, missing values as a
    dash, and every float column not given a format in `formats` (as for pandas'
    `Styler.format`) at four significant digits; the book's stylesheet scrolls a wide table
    instead of letting it overflow the text column."""
    df = df.dropna(axis="columns", how="all")
    if isinstance(formats, str):
        formats = dict.fromkeys(df.columns, formats)
    floats = df.select_dtypes("float").columns
    formats = {**dict.fromkeys(floats, "{:.4g}"), **(formats or {})}
    formats = {heading(c): f for c, f in formats.items() if c in df.columns}
    df = df.rename(columns=heading)
    return df.style.hide(axis="index").format(formats, na_rep="–")


HEADINGS = {  # the records' column names a reader would not parse
    "ci_low": "interval low",
    "ci_high": "interval high",
    "n_expert": "experts",
    "source_n_expert": "source experts",
    "target_n_expert": "target experts",
    "p_holm": "p (Holm)",
    "verdict_holm": "verdict (Holm)",
    "ari": "ARI",
    "ari_random": "ARI of random partitions",
    "cpu_s_per_run": "CPU s per run",
    "wall_s_per_run": "wall s per run",
    "runs_per_core_min": "runs per core-minute",
}


def heading(column):
    """A record's column name as a table heading, its named terms spelled out; other names
    (tasks, profile fields) stay as the code spells them."""
    if not isinstance(column, str):
        return column
    prefix, _, rest = column.partition("_")
    if prefix == "heldout" and rest:
        return f"held-out {heading(rest)}"
    return HEADINGS.get(column, column)


COLUMN_IN = 7.5  # the book's text column, in inches at the browser's 96-100 px per inch


def save_figure(fig: Figure, path) -> Image:
    """Write `fig` as PNG and return it as an image for `glue`. The page shrinks a figure wider
    than the text column to fit it; its text is enlarged by as much first, so that every label
    reads at the theme's size on the page."""
    scale = fig.get_figwidth() / COLUMN_IN
    if scale > 1:
        for text in fig.findobj(mpl.text.Text):
            text.set_fontsize(text.get_fontsize() * scale)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return Image(filename=str(layout.write_bytes(path, png.getvalue())))


def plain_values(values: dict) -> dict:
    """numpy scalars as Python numbers, so that glue pastes `0.8` and not `np.float64(0.8)`."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def duration(seconds: float) -> str:
    """'42 s', '12.5 minutes', '3.2 hours'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} minutes" if seconds < 7200 else f"{seconds / 3600:.1f} hours"
