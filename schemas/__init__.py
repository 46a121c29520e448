"""Event contracts, results and settings."""
