"""Model families, loading, conditioning and the deterministic engine."""
