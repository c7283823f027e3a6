"""The guard under WSGI apps and Django: its single pass run on a loop thread of its own."""
