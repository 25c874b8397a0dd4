"""The producer side: the Python client, input readers and result writers."""
