"""phy package."""
