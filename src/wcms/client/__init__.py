"""The WCMS client: the agent that runs on each lab PC and reports it to the server."""

from wcms import __version__

CLIENT_VERSION = __version__
