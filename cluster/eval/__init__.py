"""Evaluation: retrieval quality on BEIR-layout datasets (``riverbed eval retrieval``)."""
