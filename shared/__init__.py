"""FedSpine fleet: shared package."""
