"""federation/api package."""
