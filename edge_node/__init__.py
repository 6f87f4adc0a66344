"""FedSpine fleet: edge_node package."""
