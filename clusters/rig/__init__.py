"""clusters/rig package."""
