"""Admission: who may ask, how often, and when.

API keys (``keys``), token buckets (``ratelimit``), the concurrency gate and its fair queue
(``gate``), what a request body may say (``body``), and the one admission step the handlers
call (``admit``).
"""
