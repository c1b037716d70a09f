"""Integrations of fastalign into other training libraries (``fastalign.integrations.trl``)."""
