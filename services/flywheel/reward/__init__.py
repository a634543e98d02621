"""The reward service: pluggable typed scorers, dynamic batching, KServe v2 API, Kafka scoring
worker, hot reload of reward models, and pairwise reward-model training.

Heavy dependencies (torch, transformers) are imported by the modules that need them, not here.
"""
