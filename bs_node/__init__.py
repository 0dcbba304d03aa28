"""bs_node package."""
