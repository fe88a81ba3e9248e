"""Scoring a pool of candidates: the pool, ranking metrics, the report, the synthetic pool."""
