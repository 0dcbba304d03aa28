"""fedlora package."""
