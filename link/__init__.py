"""The link layer: the factory that opens a bench's uplink, and ARQ on both sides."""
