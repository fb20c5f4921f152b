"""latentd.client: the `latentd` command line (and, with the service, the Python SDK); never imports torch."""
