"""Evaluation harness: attribution baselines, retraining ground truth (LOO, LDS), metrics, benchmark.

Scores follow DESIGN §1: scores[x, z] > 0 means training example z is a proponent of test example x.
"""
