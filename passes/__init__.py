"""Graph passes, one module per pass, registered by name in ``bnncc.passmanager``."""
