"""deployfs: a deployment server whose whole interface is a filesystem."""

__version__ = "0.1.0"
