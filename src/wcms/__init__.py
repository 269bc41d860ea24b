"""WCMS: computer lab management (server and client in one distribution)."""

__version__ = "1.0.0"
