"""The anomaly contract between the worker (writer) and its readers (CLI, dashboard).

An anomaly carries a fixed-length **anomaly vector**: the entity's recent window, normalised,
followed by context features. Readers search similar anomalies by cosine distance over it.

Layout (float32, ``VECTOR_DIM`` = 32)::

    index   feature
    0..23   the last WINDOW_LEN observed values, oldest first, ending with the anomalous one,
            as robust z-scores against the entity's slow level and scale, clipped to +-CLIP and
            divided by CLIP; left-padded with 0 while the entity has fewer observations
    24      anomaly score in [0, 1]
    25, 26  sin, cos of the hour of day (UTC) of the observation
    27      level shift: (fast level - slow level) / slow scale, clipped, / CLIP
    28      variance ratio: ln(recent residual variance / long-run one), clipped to +-CLIP, / CLIP
    29      one-step surprise: signed z of the observation against its prediction, / CLIP
    30      stuck: ln(1 + repeats of the same value in a row) / ln(1 + 64), at most 1
    31      sampling interval: log10(seconds between observations) / 6, clipped to [-1, 1]
"""

from __future__ import annotations

from typing import Final

VECTOR_DIM: Final = 32  # length of every anomaly vector (float32)
WINDOW_LEN: Final = 24  # leading positions: the recent window of values
CLIP: Final = 10.0  # z-scores are clipped to +-CLIP and divided by it
F_SCORE: Final = 24
F_HOUR_SIN: Final = 25
F_HOUR_COS: Final = 26
F_LEVEL_SHIFT: Final = 27
F_VARIANCE_RATIO: Final = 28
F_SURPRISE: Final = 29
F_STUCK: Final = 30
F_INTERVAL: Final = 31
FEATURES: Final = (
    "score",
    "hour_sin",
    "hour_cos",
    "level_shift",
    "variance_ratio",
    "surprise",
    "stuck",
    "interval",
)
assert WINDOW_LEN + len(FEATURES) == VECTOR_DIM
