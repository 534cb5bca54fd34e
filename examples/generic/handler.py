"""A generic endpoint that serves a fixed registry of functions (plain-JSON or cloudpickle).

Jobs name the function: `{"function_name": "add", "serialization_format": "json", "args": [1, 2]}`.
The default worker module `handler_worker.generic` also accepts cloudpickled functions:
see `client.py`.
"""

from functions import Counter, add

from handler_worker.generic import create_handler

handler = create_handler({"add": add, "Counter": Counter}, allow_pickled=False)
