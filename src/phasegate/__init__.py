"""phasegate: zero-downtime, multi-stage schema migrations gated on live code versions."""

__version__ = "0.1.0"
