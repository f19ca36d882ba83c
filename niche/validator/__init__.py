"""Validator: challenges, querying, verification, scoring, weights."""
