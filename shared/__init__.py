"""FedSpine fleet: the wire protocol, topics, transport, config and logging shared by every process."""

__version__ = "0.1.0"
