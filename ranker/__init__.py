"""Ranking: temporal splits, full-catalogue metrics, the recommender interface, baselines and
the offline evaluation harness (``avrec evaluate``)."""
