"""featrecon's version, recorded in every cache and checkpoint it writes."""

__version__ = "0.3.0"
