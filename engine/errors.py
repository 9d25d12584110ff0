"""Typed errors, each with the HTTP status and error type it maps to; the HTTP layer (deployments)
shapes them for each API."""


class OrchardError(Exception):
    """Base class: every error the engine raises on purpose."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ModelLoadError(OrchardError):
    """A model source could not be resolved or read (missing, corrupt, offline...)."""

    status_code = 500
    error_type = "model_load_error"


class UnsupportedModelError(ModelLoadError):
    """The file is readable but its architecture or quantization is not supported."""


class InvalidRequestError(OrchardError):
    """The request is malformed or out of range: a 400 for the client."""

    status_code = 400
    error_type = "invalid_request_error"


class OverloadedError(OrchardError):
    """The engine's queue is full; the client should retry later."""

    status_code = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s


class EngineDeadError(OrchardError):
    status_code = 503
    error_type = "server_error"


class RequestFailedError(OrchardError):
    """One request failed inside the engine (its own work, e.g. detokenizing); the others go on."""

    status_code = 500
    error_type = "server_error"


class UnknownAdapterError(OrchardError):
    """A request named an adapter (a `model`) this engine does not serve."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = "model"):
        super().__init__(message, param=param, code="model_not_found")


class AdapterLoadError(InvalidRequestError):
    """An adapter could not be loaded (missing file, shapes that do not fit the base...): the
    requests for it fail with the reason; the base and the other adapters keep serving."""

    status_code = 422

    def __init__(self, message: str):
        super().__init__(message, param="model", code="adapter_load_failed")


class AdapterBusyError(OrchardError):
    """An operator's unload (or load) that would evict an adapter requests are using."""

    status_code = 409
    error_type = "invalid_request_error"

    def __init__(self, message: str):
        super().__init__(message, param="model", code="adapter_busy")
