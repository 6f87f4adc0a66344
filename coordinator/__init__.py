"""FedSpine fleet: coordinator package."""
