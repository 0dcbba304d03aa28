"""edge_node package."""
