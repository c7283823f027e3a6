"""The guard under WSGI apps and Django: its steps run on a loop thread of its own."""
