"""Worker runtime of handler-operator: loads HANDLER_MODULE and runs it on the real runpod SDK.

Public names for handler authors: `HandlerEvent`, `validate_input`, `InputValidationError`.
"""

import handler_protocol
from handler_worker.events import HandlerEvent
from handler_worker.validation import InputValidationError, validate_input

__all__ = ["HandlerEvent", "InputValidationError", "validate_input"]
__version__ = handler_protocol.__version__
