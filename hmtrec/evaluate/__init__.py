"""Evaluation: exact ranking metrics, full and candidate ranking, reports."""
