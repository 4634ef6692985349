"""The gateway described as OpenAPI 3.1 (``document``, from the route table, the error types
and the running config; its pieces in ``schemas``) and served to people at ``/docs``
(``pages``)."""
