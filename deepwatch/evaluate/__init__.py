"""Evaluation: binary and per-type metrics, the KDD contest cost, reports."""
