"""The ASGI ingress."""
