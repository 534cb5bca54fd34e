"""What every part of handler-operator agrees on: endpoint ids, URLs, job statuses, the HTTP
API's wire models and the client of that API. The gateway, operator, worker runtime and
`handlerctl` import it; it imports none of them."""

__version__ = "0.1.0"
