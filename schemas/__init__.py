"""Shared contracts: Kafka envelopes, settings, ids and error types. Imports nothing of ours."""
