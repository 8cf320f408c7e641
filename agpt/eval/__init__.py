"""Evaluation: held-out perplexity, sampling and metric plots (SPEC §8 "Evaluation")."""

from agpt.eval.perplexity import (
    SEED_CONTEXT,
    SEED_POSITIONS,
    Perplexity,
    Plan,
    perplexity,
    score,
    seed_plan,
    segments_plan,
    sliding_plan,
)
from agpt.eval.plot import plot_metrics, read_metrics
from agpt.eval.sample import sample

__all__ = ["SEED_CONTEXT", "SEED_POSITIONS", "Perplexity", "Plan", "perplexity", "plot_metrics",
           "read_metrics", "sample", "score", "seed_plan", "segments_plan", "sliding_plan"]
