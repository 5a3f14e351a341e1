"""`finesam serve`: the interactive page and its HTTP API over one loaded model."""

from finesam.serve.app import create_app
from finesam.serve.host import MaskRequest, ModelHost, NotFound

__all__ = ["MaskRequest", "ModelHost", "NotFound", "create_app"]
