"""loss-service: torch.nn.functional losses (values and gradients) over HTTP."""

__version__ = "0.1.0"
