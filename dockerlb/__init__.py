"""dockerlb: Docker labels in, Linux IPVS services out."""

__version__ = "0.1.0"
