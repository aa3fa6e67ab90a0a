"""The depth study."""
