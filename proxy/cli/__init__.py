"""The client and operator commands: the terminal chat, pull/warmup/status, and the demo with
its engine. None of this runs inside the gateway's server process.
"""
