"""fedgate package."""
