"""Evaluation harness: attribution baselines, retraining ground truth (LOO, LDS), metrics, benchmark.

Scores follow docs/design.md, "What a score means": scores[x, z] > 0 means training example z is a proponent of test example x.
"""
