"""The upstream side: the HTTP/1.1 client and its pool (``client``), opening a request with
its retries (``forward``, ``headers``), copying the answer to the client (``relay``) while
reading its statistics (``scanners``; ``sse`` for event streams), and the background probe
(``probe``).
"""
